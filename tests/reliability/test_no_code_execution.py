"""Nobody in where they don't belong: no rltk module calls eval/exec or sympy's string parsers,
and remote model code stays off unless a recipe turns it on."""
from __future__ import annotations

import ast
from pathlib import Path

from rltk.validate import build_recipe

ROOT = Path(__file__).resolve().parents[2]
BUILTINS = {"eval", "exec", "compile", "__import__"}  # called by bare name (model.eval() is fine)
SYMPY_PARSERS = {"sympify", "parse_expr", "parse_latex"}  # by any name or attribute


def _calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            bare = isinstance(func, ast.Name) and func.id in BUILTINS | SYMPY_PARSERS
            attribute = isinstance(func, ast.Attribute) and func.attr in SYMPY_PARSERS
            if bare or attribute:
                name = func.id if isinstance(func, ast.Name) else func.attr
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}()")
    return found


def test_no_module_evaluates_strings():
    """math-verify (an ANTLR grammar, inside killable workers) is the only reader of model answers."""
    files = [*ROOT.joinpath("rltk").rglob("*.py"), *ROOT.joinpath("rewards").rglob("*.py")]
    assert len(files) > 20
    offenders = [hit for path in files for hit in _calls(path)]
    assert offenders == []


def test_remote_code_is_off_by_default():
    assert build_recipe({}).model.trust_remote_code is False
    assert build_recipe({"model": {"trust_remote_code": True}}).model.trust_remote_code is True
