"""Where a recipe's held-out (evaluation) rows come from, and the slice carved out of training when
the source has no test split. Evaluation never runs on training rows (docs/recipes.md, "Held-out
data"):

1. ``data.eval_source`` set to another source than ``data.source``: its ``data.test_split``.
2. Otherwise (no ``eval_source``, or the same one) the source's own ``data.test_split`` when the
   source has one apart from ``data.train_split``: the built-in task (train and test are disjoint
   by the SHA-1 of the question), a directory with ``test*`` files next to its training files, a Hub
   dataset with a ``test`` split.
3. Otherwise (one local file, a directory with no ``test*`` files, a Hub dataset without that
   split) a held-out slice is *carved*: the ``data.heldout_size`` (default ``data.num_test``)
   distinct questions of the training split whose whitespace-normalised text has the lowest SHA-1
   are held out, and every training row with one of those questions is left out of training. No
   seed is involved: the slice depends only on the question texts, so it is the same at every
   seed, resume, process count and ``rltk eval`` run, and rows keep their ``<train_split>-<row>``
   ids. A slice of at least all distinct questions is refused with one line.
4. ``data.test_split`` equal to ``data.train_split`` names the training rows on purpose (how
   ``rltk eval --split train`` samples teacher traces); the RL trainer refuses it
   (:func:`rltk.data.recipe.check_heldout`).

Every decision is a pure function here (:func:`heldout_kind`, :func:`carve`,
:func:`rltk.data.loaders.split_files`, :func:`rltk.data.loaders.unknown_split`); the functions that
look at a source (:func:`plan_heldout`, :func:`carve_for`) only gather their inputs.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rltk.data.loaders import (
    _FILE_FORMATS,
    DataError,
    Example,
    hub_split_names,
    load_examples,
    named_split_files,
    split_files,
)

if TYPE_CHECKING:
    from rltk.schema import DataConfig

__all__ = ["Carve", "HeldOut", "carve", "carve_for", "heldout_kind", "heldout_size", "oversized_heldout",
           "plan_heldout", "question_key", "same_source"]

log = logging.getLogger(__name__)

HeldOutKind = Literal["eval_source", "test_split", "training_split", "carved"]


# ------------------------------------------------------------------------------------ pure rules


def heldout_kind(*, separate_eval_source: bool, same_split: bool, has_test_split: bool) -> HeldOutKind:
    """Where evaluation rows come from (module docstring, rules 1-4)."""
    if separate_eval_source:
        return "eval_source"
    if same_split:
        return "training_split"
    return "test_split" if has_test_split else "carved"


def question_key(question: str) -> str:
    """The text two rows share when they ask the same question: whitespace runs collapsed."""
    return " ".join(question.split())


def _rank(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Carve:
    heldout: list[Example]  # one row per held-out question, in source order
    rest: list[Example]  # the training rows: every row whose question is not held out, in source order
    distinct: int  # distinct questions in the training split before the carve


def carve(examples: Sequence[Example], size: int) -> Carve:
    """Hold out the ``size`` distinct questions of ``examples`` with the lowest SHA-1 of
    :func:`question_key`; ValueError when ``size`` is not below the number of distinct questions
    (nothing would be left to train on) or is below 1."""
    first: dict[str, int] = {}
    for i, e in enumerate(examples):
        first.setdefault(question_key(e.question), i)
    if size < 1 or size >= len(first):
        raise ValueError(f"{size} held-out rows out of {len(first)} distinct problems")
    chosen = set(sorted(first, key=lambda k: (_rank(k), k))[:size])
    heldout = [examples[i] for i in sorted(first[k] for k in chosen)]
    rest = [e for e in examples if question_key(e.question) not in chosen]
    return Carve(heldout, rest, len(first))


def same_source(source: str, other: str | None) -> bool:
    """True when ``other`` (an ``eval_source``) is unset or names ``source``: the same string or
    the same local file or directory."""
    if other is None or other == source:
        return True
    a, b = Path(source).expanduser(), Path(other).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


# ------------------------------------------------------------------------------------ looking at sources


def _directory_files(path: Path) -> list[str]:
    return sorted(str(p) for p in path.rglob("*") if p.suffix in _FILE_FORMATS and p.is_file())


def _local_kind(source: str) -> str | None:
    """"file", "dir" or None (builtin or a Hub id)."""
    if source == "builtin":
        return None
    path = Path(source).expanduser()
    if path.suffix in _FILE_FORMATS:
        return "file"
    return "dir" if path.is_dir() else None


def _training_files(cfg: DataConfig) -> list[str]:
    """The local files the training split of ``cfg.source`` reads (empty for builtin/Hub)."""
    kind = _local_kind(cfg.source)
    if kind == "file":
        return [cfg.source]
    if kind == "dir":
        return split_files(_directory_files(Path(cfg.source).expanduser()), cfg.train_split, cfg.test_split)
    return []


_HUB_SPLITS: dict[tuple, list[str] | None] = {}


def _missing_test_split(cfg: DataConfig) -> tuple[bool, list[str] | None]:
    """(the source has no ``test_split`` apart from its training rows, the splits it has when known)."""
    if cfg.source == "builtin":
        return False, None
    kind = _local_kind(cfg.source)
    if kind == "file":
        return True, None
    if kind == "dir":
        return not named_split_files(_directory_files(Path(cfg.source).expanduser()), cfg.test_split,
                                     cfg.train_split), None
    key = (cfg.source, cfg.subset, cfg.test_split)
    if key not in _HUB_SPLITS:
        _HUB_SPLITS[key] = hub_split_names(cfg.source, cfg.test_split, cfg.subset)
    available = _HUB_SPLITS[key]
    return available is not None, available


@dataclass(frozen=True)
class HeldOut:
    """Where a recipe's evaluation rows come from; :meth:`describe` is the line logged and reported."""

    kind: HeldOutKind
    source: str  # read for evaluation
    split: str  # its split (the training split when carved)
    train_source: str
    train_split: str
    size: int | None = None  # carved: held-out rows
    train_rows: int | None = None  # carved: the rows left to training
    available: tuple[str, ...] | None = None  # carved from a Hub dataset: the splits it has
    split_wanted: str = "test"  # carved: the test split the source lacks

    def describe(self) -> str:
        if self.kind == "eval_source":
            return f"held-out: {self.source} (split '{self.split}', data.eval_source)"
        if self.kind == "test_split":
            return f"held-out: split '{self.split}' of {self.source}; training uses split '{self.train_split}'"
        if self.kind == "training_split":
            return (f"held-out: split '{self.split}' of {self.source} is the training split (data.test_split = "
                    "data.train_split): these are training rows")
        has = f"; its splits: {', '.join(self.available)}" if self.available else ""
        return (f"held-out: {self.size:,} rows carved from {self.source} (it has no '{self.split_wanted}' split{has}; "
                f"data.heldout_size rows picked by the SHA-1 of their question); training uses the other "
                f"{self.train_rows:,}")


def heldout_size(cfg: DataConfig) -> int:
    """Rows to carve: ``data.heldout_size``, else ``data.num_test``."""
    size = cfg.heldout_size if cfg.heldout_size is not None else cfg.num_test
    if size is None:
        raise DataError(f"data.heldout_size: {cfg.source} has no '{cfg.test_split}' split, so the held-out rows "
                        "are carved from its training rows, and data.num_test is null; set data.heldout_size")
    return size


_CARVES: dict[tuple, Carve] = {}


def _signature(cfg: DataConfig) -> tuple:
    """What a carve depends on: the recipe fields that select rows, and each local file's size and mtime."""
    stats = []
    for f in _training_files(cfg):
        try:
            st = Path(f).expanduser().stat()
            stats.append((f, st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((f, None, None))
    return (cfg.source, cfg.subset, cfg.train_split, cfg.test_split, cfg.prompt_field, cfg.answer_field,
            cfg.solution_field, cfg.extract_boxed_answer, heldout_size(cfg), tuple(stats))


def carve_for(cfg: DataConfig) -> Carve:
    """The carve of ``cfg``'s training split (cached per process while the files are unchanged);
    DataError (one line) when the held-out size leaves nothing to train on."""
    key = _signature(cfg)
    if key not in _CARVES:
        size = heldout_size(cfg)
        pool = load_examples(cfg.source, split=cfg.train_split, prompt_field=cfg.prompt_field,
                             answer_field=cfg.answer_field, solution_field=cfg.solution_field, subset=cfg.subset,
                             extract_boxed_answer=cfg.extract_boxed_answer, other_split=cfg.test_split)
        try:
            result = carve(pool, size)
        except ValueError:
            distinct = len({question_key(e.question) for e in pool})
            raise DataError(_too_big(cfg, size, f"{distinct} distinct usable problems")) from None
        if len(_CARVES) >= 8:
            _CARVES.pop(next(iter(_CARVES)))
        _CARVES[key] = result
    return _CARVES[key]


def _too_big(cfg: DataConfig, size: int, what: str) -> str:
    name = "data.heldout_size" if cfg.heldout_size is not None else "data.num_test (data.heldout_size unset)"
    return (f"{name} = {size}: {cfg.source} has no '{cfg.test_split}' split, so held-out rows are carved from its "
            f"training rows, and it has only {what}: nothing would be left to train on; lower it or set "
            "data.eval_source")


def plan_heldout(cfg: DataConfig) -> HeldOut:
    """Where ``cfg``'s evaluation rows come from; for a carve, the carve is made (and checked) here."""
    separate = not same_source(cfg.source, cfg.eval_source)
    same_split = cfg.test_split == cfg.train_split
    missing, available = (False, None) if separate or same_split else _missing_test_split(cfg)
    kind = heldout_kind(separate_eval_source=separate, same_split=same_split, has_test_split=not missing)
    if kind == "eval_source":
        return HeldOut(kind, str(cfg.eval_source), cfg.test_split, cfg.source, cfg.train_split)
    if kind != "carved":
        return HeldOut(kind, cfg.source, cfg.test_split, cfg.source, cfg.train_split)
    c = carve_for(cfg)
    return HeldOut(kind, cfg.source, cfg.train_split, cfg.source, cfg.train_split, size=len(c.heldout),
                   train_rows=len(c.rest), available=tuple(available) if available else None,
                   split_wanted=cfg.test_split)


# ------------------------------------------------------------------------------------ recipe validation


def _count_rows(path: str) -> int | None:
    """Rows of a local data file without parsing it into a table (None: cannot tell cheaply; the
    loader reports unreadable files). An upper bound on usable rows (skipped rows count)."""
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        with open(path, "rb") as handle:
            head = handle.read(4096).lstrip()
            handle.seek(0)
            if path.endswith(".json") and head.startswith(b"["):
                rows = json.load(handle)
                return len(rows) if isinstance(rows, list) else None
            return sum(1 for line in handle if line.strip())
    except Exception:  # unreadable: the loader says why
        return None


def oversized_heldout(cfg: DataConfig) -> str | None:
    """The one-line problem when a local source with no test split cannot give the held-out slice
    (checked when the recipe loads, so ``rltk check`` and ``rltk train`` stop before any model);
    None otherwise. Hub datasets are checked when they load (:func:`carve_for`)."""
    if not same_source(cfg.source, cfg.eval_source) or cfg.test_split == cfg.train_split:
        return None
    if _local_kind(cfg.source) is None or not Path(cfg.source).expanduser().exists():
        return None
    missing, _ = _missing_test_split(cfg)
    if not missing:
        return None
    try:
        size = heldout_size(cfg)
    except DataError as e:
        return str(e)
    counts = [_count_rows(f) for f in _training_files(cfg)]
    if not counts or None in counts:
        return None
    rows = sum(counts)
    if size >= rows:
        return _too_big(cfg, size, f"{rows} rows")
    return None
