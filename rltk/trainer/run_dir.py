"""Run directories as a contract (docs/reliability.md#run-directories-and-checkpoints).

A run owns ``trainer.output_dir``. When training starts it records its identity there,
``rltk_run.json``: the kind of run (``rl`` or ``redi``), a run id (stamped into every checkpoint
it writes, so pruning only ever touches its own checkpoints), the recipe, and a fingerprint of the
recipe without :data:`SAFE_KEYS`. Before anything is written or moved, :func:`claim` checks the
directory:

* a directory holding another run (an identity file, ``metrics.jsonl``, ``result.json``,
  ``recipe.json``, any checkpoint, or REDI's metrics, recipe or result) is refused with one line,
  unless the run is continued (``--resume``) or ``--overwrite`` moves the old run aside to
  ``<dir>.old-<YYYYmmdd-HHMMSS>`` next to it: nothing is ever deleted;
* ``--resume`` compares the recipe with the one the run recorded and names every changed dotted
  key; a change outside :data:`SAFE_KEYS` needs ``--allow-changes``, and accepted changes are
  appended to the identity file's ``resumes`` history;
* every path from the recipe is resolved (``~`` expanded) and confined: ``sft.output_subdir`` and
  ``redi.output_subdir`` must name a subdirectory strictly inside the run directory, not one of
  the run's own files or directories, and not each other.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rltk.schema import ConfigError, Recipe, flatten_keys
from rltk.io import fsync_dir

log = logging.getLogger(__name__)

IDENTITY_FILE = "rltk_run.json"
IDENTITY_FORMAT = 1
# Files (and the checkpoints directory) whose presence means a directory holds a run.
RUN_FILES = (IDENTITY_FILE, "metrics.jsonl", "result.json", "recipe.json",
             "redi_metrics.jsonl", "redi_recipe.json", "redi_result.json")
# Recipe keys that a resumed run may change without --allow-changes: how long it runs, how often it
# saves, evaluates and logs, how many checkpoints it keeps, and where its directory is.
SAFE_KEYS = ("trainer.steps", "trainer.save_every", "trainer.eval_every", "trainer.keep_checkpoints",
             "trainer.output_dir", "eval.*", "logging.*")
# Names inside a run directory that belong to the run itself: no output_subdir may start with one.
RESERVED_NAMES = frozenset(RUN_FILES) | {"checkpoints", "eval", "report", "compare", "tiny-init",
                                         "pairing_probe.json"}
_SUBDIR_KEYS = ("sft.output_subdir", "redi.output_subdir")


# ---------------------------------------------------------------------------------------- paths


def output_dir(recipe: Recipe) -> Path:
    """``trainer.output_dir`` with ``~`` expanded; an empty path is a ConfigError."""
    raw = recipe.trainer.output_dir
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError("trainer.output_dir: must not be empty")
    return Path(raw).expanduser()


def confined_subdir(run: Path, value: Any, key: str) -> Path:
    """``run / value`` when ``value`` names a directory strictly inside ``run`` (after resolving
    ``..`` and symlinks) that is not one of the run's own names; else a one-line ConfigError."""
    hint = "name a subdirectory of trainer.output_dir, e.g. 'sft'"
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: must not be empty; {hint}")
    sub = Path(value).expanduser()
    if sub.is_absolute():
        raise ConfigError(f"{key}: '{value}' is an absolute path; {hint}")
    base = run.resolve()
    target = (run / sub).resolve()
    if target == base or base not in target.parents:
        where = "is the run directory itself" if target == base else f"resolves to {target}, outside {base}"
        raise ConfigError(f"{key}: '{value}' {where}; {hint}")
    relative = target.relative_to(base)
    if relative.parts[0] in RESERVED_NAMES:
        raise ConfigError(f"{key}: '{value}' is inside the run's own '{relative.parts[0]}'; choose another name")
    return run / relative


def subdir(recipe: Recipe, key: str) -> Path:
    """The confined directory of ``sft.output_subdir`` or ``redi.output_subdir``."""
    section, name = key.split(".")
    return confined_subdir(output_dir(recipe), getattr(getattr(recipe, section), name), key)


def check_recipe_paths(recipe: Recipe) -> None:
    """Every run-directory path of the recipe, resolved and confined (one-line ConfigErrors)."""
    run = output_dir(recipe)
    sft, redi = (subdir(recipe, key).resolve() for key in _SUBDIR_KEYS)
    if sft == redi or sft in redi.parents or redi in sft.parents:
        raise ConfigError(f"redi.output_subdir: '{recipe.redi.output_subdir}' overlaps sft.output_subdir "
                          f"'{recipe.sft.output_subdir}' under {run}; give the two models separate directories")


# ---------------------------------------------------------------------------------------- recipes


def plain_recipe(recipe: Recipe | dict) -> dict[str, Any]:
    """The recipe as JSON data (what the identity file stores and compares)."""
    data = recipe.to_dict() if isinstance(recipe, Recipe) else recipe
    return json.loads(json.dumps(data, default=str))


def is_safe_key(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in SAFE_KEYS)


def fingerprint(recipe: Recipe | dict) -> str:
    """sha256 of the recipe's dotted keys and values, without :data:`SAFE_KEYS`."""
    flat = {k: v for k, v in flatten_keys(plain_recipe(recipe)).items() if not is_safe_key(k)}
    return "sha256:" + hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()


_ABSENT = object()


def recipe_changes(stored: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every leaf that differs. A key the stored recipe lacks (a
    field added to rltk since) counts only when its value is not the default; a key the current
    recipe lacks (a field since removed) does not count."""
    old, new = flatten_keys(plain_recipe(stored)), flatten_keys(plain_recipe(current))
    defaults = flatten_keys(plain_recipe(Recipe()))
    changes = []
    for key in sorted(new):
        before = old.get(key, _ABSENT)
        if before is _ABSENT:
            if key in defaults and new[key] == defaults[key]:
                continue
        elif before == new[key]:
            continue
        changes.append((key, before, new[key]))
    return changes


def format_changes(changes: list[tuple[str, Any, Any]], limit: int = 8) -> str:
    shown = [f"{k}: {'(absent)' if a is _ABSENT else repr(a)} -> {b!r}" for k, a, b in changes[:limit]]
    more = f", and {len(changes) - limit} more" if len(changes) > limit else ""
    return ", ".join(shown) + more


# ---------------------------------------------------------------------------------------- directories


def run_contents(path: Path) -> list[str]:
    """What in ``path`` marks it as holding a run (empty: it holds none)."""
    if not path.is_dir():
        return []
    found = [name for name in RUN_FILES if (path / name).exists()]
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        found.append("checkpoints/")
    return found


def read_identity(path: Path) -> dict | None:
    """The identity file of run directory ``path``; None when there is none or it is unreadable."""
    try:
        data = json.loads((path / IDENTITY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def move_aside(path: Path) -> Path:
    """Rename run directory ``path`` to a free ``<name>.old-<YYYYmmdd-HHMMSS>[-N]`` next to it."""
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve():
        raise ConfigError(f"--overwrite: trainer.output_dir '{path}' is the current or home directory (or contains "
                          "it) and is not moved; choose another trainer.output_dir")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = resolved.with_name(f"{resolved.name}.old-{stamp}")
    n = 2
    while target.exists():
        target = resolved.with_name(f"{resolved.name}.old-{stamp}-{n}")
        n += 1
    try:
        os.rename(resolved, target)
    except OSError as exc:
        raise ConfigError(f"--overwrite: cannot move {path} aside to {target}: {exc.strerror or exc}; move it "
                          "yourself or choose another trainer.output_dir") from None
    fsync_dir(resolved.parent)
    return target



def _write_exclusive(path: Path, data: dict) -> None:
    """Write ``path`` whole and fsynced, failing with FileExistsError when it already exists."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(data, indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, path)  # atomic, and refuses an existing name
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links
            fd2 = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd2, "w") as handle:
                handle.write(json.dumps(data, indent=2) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)


class _Ranks:
    """The main-process test before an Accelerator exists (global rank 0 of a launch), without a
    barrier: creating accelerate's state this early would fix it before the Accelerator's own
    settings (DeepSpeed) apply. None is needed: every process only reads before the main one moves
    the old run aside, a process that looks after the move finds nothing to object to, and the
    identity is written after the model is prepared, a collective every process reaches after its
    check."""

    @property
    def is_main_process(self) -> bool:
        return int(os.environ.get("RANK", "0")) == 0

    def wait_for_everyone(self) -> None:
        pass


# ---------------------------------------------------------------------------------------- the claim


@dataclass
class RunDir:
    """A claimed run directory; :meth:`start` records the identity when training starts."""

    path: Path
    kind: str
    recipe: dict[str, Any]
    run_id: str
    resumed: bool = False  # continues a run already in the directory
    stored: dict | None = None  # its identity file, when it had one
    changes: list = field(default_factory=list)
    is_main: bool = True
    started: bool = False

    def start(self, step: int = 0) -> None:
        """Write (a new run) or update (a resumed one) the identity file; main process, once."""
        if self.started or not self.is_main:
            self.started = True
            return
        self.path.mkdir(parents=True, exist_ok=True)
        identity = {"format": IDENTITY_FORMAT, "kind": self.kind, "run_id": self.run_id,
                    "created": _now(), "fingerprint": fingerprint(self.recipe), "safe_keys": list(SAFE_KEYS),
                    "rltk": _version(), "recipe": self.recipe, "resumes": []}
        if not self.resumed:
            try:
                _write_exclusive(self.path / IDENTITY_FILE, identity)
            except FileExistsError:
                raise ConfigError(f"trainer.output_dir '{self.path}': another run claimed it since this one "
                                  "started; choose another trainer.output_dir") from None
        else:
            if self.stored:
                identity.update(created=self.stored.get("created", identity["created"]),
                                resumes=list(self.stored.get("resumes", [])))
            identity["resumes"].append({"time": _now(), "step": step,
                                        "changed": {k: [None if a is _ABSENT else a, b] for k, a, b in self.changes}})
            from rltk.io import atomic_write_json

            atomic_write_json(self.path / IDENTITY_FILE, identity)
        self.started = True


def claim(recipe: Recipe, kind: str, *, resume: bool = False, overwrite: bool = False, allow_changes: bool = False,
          resumable: bool = True, ranks=None) -> RunDir:
    """Check ``trainer.output_dir`` for a ``kind`` run before anything is written, and move an old
    run aside under ``overwrite``. Every process checks; the main process moves. ``ranks`` is the
    Accelerator (or None: a barrier that needs none when launched alone)."""
    ranks = ranks or _Ranks()
    check_recipe_paths(recipe)
    path = output_dir(recipe)
    current = plain_recipe(recipe)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run, or move it aside")
    found = run_contents(path)
    stored = read_identity(path)
    run = RunDir(path, kind, current, _new_run_id(), is_main=ranks.is_main_process)
    if found and resume:
        run.resumed, run.stored = True, stored
        _check_resume(run, found, allow_changes)
    elif found and not overwrite:
        options = ("continue it with --resume, " if resumable else "") + "move it aside with --overwrite"
        described = f"another {stored['kind']} run" if stored and stored.get("kind") else "another run"
        raise ConfigError(f"trainer.output_dir '{path}' holds {described} ({', '.join(found)}); {options}, or "
                          "choose another trainer.output_dir")
    if kind == "redi" and not found:  # (a run found is refused, or moved aside whole)
        _check_fresh_model_dir(subdir(recipe, "redi.output_subdir"), "redi.output_subdir")
    ranks.wait_for_everyone()  # every process has looked before the main one moves anything
    if found and overwrite and ranks.is_main_process:
        moved = move_aside(path)
        log.warning("--overwrite: moved the run in %s to %s (nothing deleted)", path, moved)
    ranks.wait_for_everyone()
    return run


def _check_resume(run: RunDir, found: list[str], allow_changes: bool) -> None:
    stored = run.stored
    if stored is None:
        legacy = run.path / "recipe.json"  # runs from before identity files recorded their recipe here
        try:
            recorded = json.loads(legacy.read_text()) if run.kind == "rl" else None
        except (OSError, ValueError):
            recorded = None
        if IDENTITY_FILE in found:
            log.warning("--resume: %s is unreadable; the recipe cannot be checked against the run's",
                        run.path / IDENTITY_FILE)
        elif recorded is None:
            log.warning("--resume: %s has no %s (a run from an older rltk); the recipe cannot be checked "
                        "against the run's", run.path, IDENTITY_FILE)
    else:
        if stored.get("kind") != run.kind:
            raise ConfigError(f"--resume: trainer.output_dir '{run.path}' holds a {stored.get('kind')} run; this "
                              f"command continues {run.kind} runs only")
        run.run_id = str(stored.get("run_id") or run.run_id)
        recorded = stored.get("recipe")
    if not isinstance(recorded, dict):
        return
    run.changes = recipe_changes(recorded, run.recipe)
    unsafe = [c for c in run.changes if not is_safe_key(c[0])]
    if unsafe and not allow_changes:
        raise ConfigError(f"--resume: the recipe differs from the run in {run.path}: {format_changes(unsafe)}; "
                          f"pass --allow-changes to resume with it anyway (changeable without it: "
                          f"{', '.join(SAFE_KEYS)})")
    if unsafe:
        log.warning("--resume --allow-changes: continuing %s with a changed recipe: %s", run.path,
                    format_changes(run.changes, limit=len(run.changes)))
    elif run.changes:
        log.info("--resume: continuing %s with %s", run.path, format_changes(run.changes, limit=len(run.changes)))


def _check_fresh_model_dir(path: Path, key: str) -> None:
    """A final-model directory a new run will replace must not hold anything already."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{key}: {path} already exists and is not this run's; choose another {key} or move it")


def _new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _version() -> str:
    import rltk

    return rltk.__version__
