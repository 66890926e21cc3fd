"""MultiPL-E scoring: known-correct completions pass, known-wrong ones fail, per language."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusellm.evaluate import multiple
from fusellm.evaluate.suites import get_suite

DATA = get_suite("multipl-e").shipped_data_dir / "nuprl" / "MultiPL-E"
COMPLETIONS = json.loads(
    (Path(__file__).parent / "data" / "eval" / "multiple" / "completions.json").read_text()
)
HUB_FIELDS = {
    "name",
    "language",
    "prompt",
    "doctests",
    "original",
    "prompt_terms",
    "tests",
    "stop_tokens",
}


def _records(language: str) -> list[dict]:
    path = DATA / f"humaneval-{language}" / "test.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _require(language: str) -> None:
    reason = multiple.available_languages()[language]
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("language", list(multiple.LANGUAGES))
def test_shipped_records_use_hub_fields(language):
    records = _records(language)
    assert len(records) >= 3
    for record in records:
        assert set(record) == HUB_FIELDS
        assert record["language"] == language


@pytest.mark.parametrize("language", list(multiple.LANGUAGES))
def test_pass_at_1_is_one_for_correct_and_zero_for_wrong(language):
    _require(language)
    records = _records(language)
    for kind, expected in (("correct", 1.0), ("wrong", 0.0)):
        scores = [
            multiple.process_results(r, [COMPLETIONS[language][r["name"]][kind]])["pass@1"]
            for r in records
        ]
        assert sum(scores) / len(scores) == expected, (language, kind, scores)


def test_completion_is_cut_at_stop_token():
    _require("py")
    record = _records("py")[0]
    good = COMPLETIONS["py"][record["name"]]["correct"]
    assert multiple.passes(record, good + "\ndef broken(:\n    syntax error here")
    assert multiple.truncate("a\ndef b", ["\ndef"]) == "a"


def test_missing_toolchain_gives_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    multiple.toolchain.cache_clear()
    try:
        reasons = multiple.available_languages()
        assert all(reasons.values())
        assert "`node` not found" in reasons["js"]
    finally:
        multiple.toolchain.cache_clear()


def test_unknown_language_is_rejected():
    with pytest.raises(ValueError, match="expected one of"):
        multiple.language_of({"name": "x", "language": "cobol"})


def test_java_with_javatuples():
    _require("java")
    if multiple.javatuples_jar() is None:
        pytest.skip("javatuples jar not installed (Debian: libjavatuples-java)")
    record = {
        **_records("java")[0],
        "prompt": "import org.javatuples.*;\n" + _records("java")[0]["prompt"],
    }
    uses_pair = "        return Pair.with(x, y).getValue0() + y;"
    assert multiple.passes(record, uses_pair)


def test_java_import_dropped_without_jar():
    text = "import java.util.*;\nimport org.javatuples.*;\nclass Problem {}\n"
    assert "javatuples" not in multiple.java_source(text, ".")
    assert multiple.java_source(text, ".:/usr/share/java/javatuples.jar") == text
