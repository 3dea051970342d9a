"""Every file the documentation points to is in the repository.

Scanned: every Markdown file, the docstrings and comments of every Python file under rltk/,
rewards/, tests/ and benchmarks/, and the comments of the YAML recipes. In them, a path that starts
with one of the repository's top-level folders (``rltk/trainer/loss.py``, ``launch/zero2.yaml``,
``docs/gpu.md``), a relative Markdown link, a bare citation of a design note that would have to sit
at the repository's root, and a dotted module path in backticks (``rltk.trainer.loss``) must name
something that exists when the test runs — so a renamed or removed file fails here, not in a
reader's hands.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("rltk", "rewards", "tests", "benchmarks", "docs", "launch", "recipes")
PYTHON_DIRS = ("rltk", "rewards", "tests", "benchmarks")
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", "build", "dist", "runs", "outputs", "wandb", "node_modules",
             ".pytest_cache", ".hypothesis"}

# a repository path: a top-level folder, then path characters, ending on a word character; not part of
# a longer path or URL (github.com/org/repo/docs/x.md is not ours)
PATH = re.compile(r"(?<![\w./~-])((?:" + "|".join(TOP_LEVEL) + r")/[\w.\-/]*\w)")
# a bare Markdown name in capitals, without a folder: such a note would have to be at the repository's root
BARE_NOTE = re.compile(r"(?<![\w./-])([A-Z][A-Z_]+\.md)\b")
# [text](target) in Markdown; the target is relative to the Markdown file
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
# `rltk.trainer.loss` or `rewards.math.math_reward` in backticks
MODULE = re.compile(r"`((?:rltk|rewards)(?:\.[A-Za-z_]\w*)+)")


def _files(pattern: str, under: tuple[str, ...] | None = None) -> list[Path]:
    roots = [ROOT / d for d in under] if under else [ROOT]
    found = []
    for root in roots:
        for path in root.rglob(pattern):
            parts = path.relative_to(ROOT).parts
            if any(p in SKIP_DIRS or p.endswith(".egg-info") for p in parts[:-1]):
                continue
            if path.is_file():
                found.append(path)
    return sorted(found)


def python_text(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every docstring and comment of a Python file."""
    source = path.read_text(encoding="utf-8")
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                out.append((body[0].lineno, body[0].value.value))
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            out.append((token.start[0], token.string))
    return out


def yaml_comments(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment of a YAML file: a '#' at the start or after whitespace."""
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = re.search(r"(?:^|\s)#(.*)$", line)
        if match:
            out.append((number, match.group(1)))
    return out


def markdown_text(path: Path) -> list[tuple[int, str]]:
    return list(enumerate(path.read_text(encoding="utf-8").splitlines(), 1))


def sources() -> list[tuple[Path, list[tuple[int, str]]]]:
    scanned = [(p, markdown_text(p)) for p in _files("*.md")]
    scanned += [(p, python_text(p)) for p in _files("*.py", PYTHON_DIRS)]
    scanned += [(p, yaml_comments(p)) for p in _files("*.yaml", ("recipes",)) + _files("*.yml", ("recipes",))]
    return scanned


def _module_exists(dotted: str) -> bool:
    """Whether ``dotted`` names a module of the repository, or a name written in one: the longest
    prefix that is a module or package, then the next component as a word of its source (its
    ``__init__.py`` for a package)."""
    parts = dotted.split(".")
    path = ROOT
    for i, part in enumerate(parts):
        if (path / part).is_dir() and not (path / part).name.startswith("__"):  # a package, with or without __init__
            path = path / part
            continue
        if (path / f"{part}.py").is_file():
            path = path / f"{part}.py"
            rest = parts[i + 1:]
            return not rest or re.search(rf"\b{re.escape(rest[0])}\b", path.read_text(encoding="utf-8")) is not None
        init = path / "__init__.py"
        return i > 0 and init.is_file() and re.search(rf"\b{re.escape(part)}\b", init.read_text(encoding="utf-8")) is not None
    return True


def references(path: Path, lines: list[tuple[int, str]]) -> list[tuple[int, str, Path | None, str]]:
    """(line, reference, where it should be, kind) for every reference in ``lines`` of ``path``."""
    found = []
    for number, text in lines:
        for match in PATH.finditer(text):
            found.append((number, match.group(1), ROOT / match.group(1), "path"))
        for match in BARE_NOTE.finditer(text):
            found.append((number, match.group(1), ROOT / match.group(1), "note"))
        if path.suffix == ".md":
            for match in LINK.finditer(text):
                target = match.group(1).split("#", 1)[0]
                if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):  # an anchor or a URL
                    continue
                found.append((number, match.group(1), (path.parent / target), "link"))
        for match in MODULE.finditer(text):
            found.append((number, match.group(1), None, "module"))
    return found


def broken_references() -> list[str]:
    broken = []
    for path, lines in sources():
        for number, ref, where, kind in references(path, lines):
            ok = _module_exists(ref) if kind == "module" else where.exists()
            if not ok:
                broken.append(f"{path.relative_to(ROOT)}:{number}: {kind} {ref!r} does not exist")
    return broken


def test_every_referenced_file_exists():
    broken = broken_references()
    assert not broken, f"{len(broken)} references to files that are not in the repository:\n" + "\n".join(broken)


def test_the_scan_reads_the_places_that_cite():
    """The scan itself: it reads docstrings, comments, recipe comments and Markdown, and finds the
    references this repository is known to hold (so a broken scanner cannot pass vacuously)."""
    by_file = {p.relative_to(ROOT).as_posix(): {r for _, r, _, _ in references(p, lines)} for p, lines in sources()}
    assert "docs/design.md" in by_file["rltk/cli.py"]  # a module docstring
    assert "docs/algorithms/reference.md" in by_file["rltk/algos/ace.py"]  # a function docstring too
    assert "docs/gpu.md" in by_file["tests/test_docs_references.py"]  # this comment: docs/gpu.md
    assert any(r.startswith("launch/") for f, refs in by_file.items() if f.startswith("recipes/") for r in refs)
    assert {"rltk/schema.py", "rltk.schema", "rltk.validate"} <= by_file["docs/design.md"]
    assert "algorithms/reference.md" in by_file["docs/design.md"]  # a relative Markdown link


@pytest.mark.parametrize("text, expected", [
    ("see rltk/trainer/loss.py.", ["rltk/trainer/loss.py"]),
    ("`launch/zero2.yaml` and recipes/quickstart/grpo.yaml,", ["launch/zero2.yaml", "recipes/quickstart/grpo.yaml"]),
    ("https://github.com/org/repo/blob/main/docs/x.md", []),
    ("tests/reliability/test_crashes.py::test_kill", ["tests/reliability/test_crashes.py"]),
])
def test_path_pattern(text, expected):
    assert [m.group(1) for m in PATH.finditer(text)] == expected


def test_missing_files_and_notes_outside_the_repository_are_reported(tmp_path):
    page = ROOT / "docs" / "page.md"  # never written: references() only reads the lines given
    lines = [(1, "Spec: " + "ALGORITHMS" + ".md §2; code: rltk/algos/no_such.py; [x](no_such.md); `rltk.no_such`")]
    found = {(kind, ref): (where is None or where.exists()) for _, ref, where, kind in references(page, lines)}
    assert found[("note", "ALGORITHMS" + ".md")] is False
    assert found[("path", "rltk/algos/no_such.py")] is False
    assert found[("link", "no_such.md")] is False
    assert not _module_exists("rltk.no_such") and _module_exists("rltk.trainer.loss")
    assert _module_exists("rltk.algos.registered") and not _module_exists("rltk.trainer.loss.no_such_name")
