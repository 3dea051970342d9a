"""rltk.eval.report: report and comparison files, atomic writes."""

import json
import os

import numpy as np
import pytest

from rltk.eval.metrics import summarize
from rltk.eval.report import PROTOCOL_KEYS, format_passk_table, write_comparison, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _protocol(**overrides):
    protocol = {
        "n": 4,
        "temperature": 0.6,
        "top_p": 0.95,
        "max_new_tokens": 32,
        "template": "builtin",
        "verifier_version": "math-verify 0.9.0",
        "truncation_rate": 0.0,
        "no_answer_rate": 0.125,
        "model": "tiny|sft",
        "num_problems": 2,
        "seed": 0,
        "maj_method": "exact",
    }
    return {**protocol, **overrides}


PER_PROBLEM = [
    {"id": "L1-a", "n": 4, "c": 1, "classes": [0, 1, 1, None], "correct": [True, False, False, False]},
    {"id": "L1-b", "n": 4, "c": 4, "classes": [5, 5, 5, 5], "correct": [True] * 4},
]


@pytest.fixture
def written(tmp_path):
    summary = summarize(PER_PROBLEM, [1, 2, 4])
    report = write_report(tmp_path / "run", summary=summary, protocol=_protocol(), per_problem=PER_PROBLEM)
    return tmp_path / "run", report


def test_report_files_exist_parse_and_leave_no_temp_files(written):
    out, report = written
    assert sorted(os.listdir(out)) == ["passk.png", "report.json", "report.md"]
    data = json.loads((out / "report.json").read_text())
    assert data["protocol"] == _protocol()
    assert data["per_problem"] == PER_PROBLEM
    assert data["summary"]["pass@k"] == {"1": 0.625, "2": 0.75, "4": 1.0}
    assert report["summary"]["maj@k"][4] == 0.5
    png = (out / "passk.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000
    md = (out / "report.md").read_text()
    assert "| temperature | 0.6 |" in md and "| model | tiny\\|sft |" in md
    assert "| variant | pass@1 | pass@2 | pass@4 | maj@1 | maj@2 | maj@4 |" in md
    assert "| tiny\\|sft | 0.625 | 0.750 | 1.000 | 0.625 | 0.750 | 0.500 |" in md
    assert oct((out / "report.json").stat().st_mode & 0o777) == "0o644"


def test_report_needs_every_protocol_key(tmp_path):
    protocol = _protocol()
    del protocol["verifier_version"]
    with pytest.raises(ValueError, match="verifier_version"):
        write_report(tmp_path, summary=summarize(PER_PROBLEM, [1]), protocol=protocol, per_problem=[])
    assert set(PROTOCOL_KEYS) == set(_protocol())


def test_numpy_values_are_stored_as_numbers(tmp_path):
    per_problem = [{"n": np.int64(4), "c": np.int64(2)}]
    write_report(tmp_path, summary=summarize(per_problem, [1]), protocol=_protocol(), per_problem=per_problem)
    assert json.loads((tmp_path / "report.json").read_text())["per_problem"] == [{"n": 4, "c": 2}]


def test_failed_write_keeps_the_old_report_and_no_temp_file(written, monkeypatch):
    out, _ = written
    before = (out / "report.json").read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    import rltk.io

    monkeypatch.setattr(rltk.io.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_report(out, summary=summarize(PER_PROBLEM, [1]), protocol=_protocol(), per_problem=[])
    assert (out / "report.json").read_bytes() == before
    assert sorted(os.listdir(out)) == ["passk.png", "report.json", "report.md"]
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_report(out, summary={"pass@k": {1: object()}}, protocol=_protocol(), per_problem=[])
    assert (out / "report.json").read_bytes() == before


def test_comparison_table_and_plot(written, tmp_path):
    out, report = written
    from_disk = json.loads((out / "report.json").read_text())  # string keys, as the CLI reads it
    other = {"summary": {"pass@k": {1: 0.5, 2: 0.6, 8: 0.9}, "avg@n": 0.5}}
    table = write_comparison(tmp_path / "cmp", {"base": from_disk, "nsr": other}, "NSR vs base")
    assert table == (
        "| variant | pass@1 | pass@2 | pass@4 | pass@8 |\n"
        "|---|---|---|---|---|\n"
        "| base | 0.625 | 0.750 | 1.000 |  |\n"
        "| nsr | 0.500 | 0.600 |  | 0.900 |"
    )
    assert format_passk_table({"base": report, "nsr": other}) == table
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert md.startswith("# NSR vs base\n") and table in md
    assert (tmp_path / "cmp" / "comparison.png").read_bytes().startswith(PNG_MAGIC)
    assert sorted(os.listdir(tmp_path / "cmp")) == ["comparison.md", "comparison.png"]
    with pytest.raises(ValueError):
        write_comparison(tmp_path, {}, "empty")
