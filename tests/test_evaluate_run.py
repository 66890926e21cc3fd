"""Every suite's real task configuration runs offline on local Hub-format JSONL with a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fusellm.evaluate import SuiteResult, run_suite
from fusellm.evaluate.multiple import available_languages
from fusellm.testing.tiny import save_tiny, tiny_model, train_tokenizer

DATA = Path(__file__).parent / "data" / "eval"
LIMIT = 2


@pytest.fixture(scope="module")
def tiny():
    texts = [
        line for path in sorted(DATA.rglob("*.jsonl")) for line in path.read_text().splitlines()
    ]
    tokenizer = train_tokenizer(texts, kind="spm", vocab_size=600)
    model = tiny_model("llama", tokenizer, hidden=32, layers=1, heads=2, max_positions=4096)
    return model, tokenizer


def _check(result: SuiteResult, out: Path, tasks: list[str], metrics: set[str]) -> None:
    assert list(result.metrics) == tasks
    for task in tasks:
        assert metrics <= set(result.metrics[task]), (task, result.metrics[task])
        assert set(result.stderr[task]) <= set(result.metrics[task])
        rows = (out / "samples" / f"{task}.jsonl").read_text().splitlines()
        assert len(rows) == result.n_samples[task] >= 1
        assert "doc" in json.loads(rows[0])
    assert result.average is not None
    saved = SuiteResult.load(out / "results.json")
    assert saved.metrics == result.metrics and saved.average == result.average
    assert (out / "lm_eval_results.json").is_file()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def test_commonsense_offline(tiny, tmp_path):
    model, tok = tiny
    out = tmp_path / "commonsense"
    result = run_suite(
        model, "commonsense", tokenizer=tok, data_dir=DATA, output_dir=out, limit=LIMIT
    )
    tasks = ["arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa"]
    _check(result, out, tasks, {"acc"})
    for task in ("arc_easy", "hellaswag", "openbookqa"):
        assert {"acc", "acc_norm"} <= set(result.metrics[task])
    assert all(0.0 <= m["acc"] <= 1.0 for m in result.metrics.values())
    assert result.average == pytest.approx(sum(m["acc"] for m in result.metrics.values()) / 5)
    config = yaml.safe_load((out / "suite_config.yaml").read_text())
    assert {m["dataset_path"] for m in config["task"]} == {"json"}


def test_bbh_offline_subset(tiny, tmp_path):
    model, tok = tiny
    out = tmp_path / "bbh"
    tasks = ["bbh_cot_fewshot_boolean_expressions", "bbh_cot_fewshot_word_sorting"]
    result = run_suite(
        model,
        "bbh",
        tokenizer=tok,
        data_dir=DATA,
        output_dir=out,
        tasks=tasks,
        limit=LIMIT,
        max_gen_toks=6,
    )
    _check(result, out, tasks, {"exact_match"})
    sample = json.loads((out / "samples" / f"{tasks[0]}.jsonl").read_text().splitlines()[0])
    assert "Let's think step by step." in json.dumps(sample)  # the real 3-shot CoT prompt


def test_local_suite_bits_per_byte(tiny, tmp_path):
    model, tok = tiny
    out = tmp_path / "local"
    result = run_suite(model, "local", tokenizer=tok, data_dir=DATA, output_dir=out, limit=LIMIT)
    tasks = [
        "fusellm_local_docs",
        "fusellm_local_code",
        "fusellm_local_docstrings",
        "fusellm_local_mc",
    ]
    _check(result, out, tasks, set())
    for task in tasks[:3]:
        assert result.metrics[task]["bits_per_byte"] > 0
    assert {"acc", "acc_norm"} <= set(result.metrics["fusellm_local_mc"])
    mean_bpb = sum(result.metrics[t]["bits_per_byte"] for t in tasks[:3]) / 3
    assert result.average == pytest.approx(mean_bpb)
    assert result.higher_is_better is False


def test_multiple_offline_shipped_data(tiny, tmp_path):
    model, tok = tiny
    out = tmp_path / "multiple"
    result = run_suite(model, "multipl-e", tokenizer=tok, output_dir=out, limit=1, max_gen_toks=12)
    runnable = [f"multiple_{lang}" for lang, reason in available_languages().items() if not reason]
    _check(result, out, runnable, {"pass@1"})
    assert all(0.0 <= m["pass@1"] <= 1.0 for m in result.metrics.values())
    for lang, reason in available_languages().items():
        if reason:
            assert result.skipped[f"multiple_{lang}"] == reason
    assert result.extra["sandbox"]["landlock_abi"] >= 0


def test_cli_on_model_folder(tiny, tmp_path):
    from fusellm.cli import app

    model, tok = tiny
    folder = save_tiny(model, tok, tmp_path / "model")
    out = tmp_path / "cli-out"
    runner = CliRunner()
    args = [
        "eval",
        "--model",
        str(folder),
        "--suite",
        "local",
        "--data-dir",
        str(DATA),
        "--output",
        str(out),
        "--limit",
        "1",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = SuiteResult.load(out / "results.json")
    assert saved.model == "model"
    assert saved.metrics["fusellm_local_docs"]["bits_per_byte"] > 0
    assert "average" in result.output

    bad = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(folder),
            "--suite",
            "commonsense",
            "--data-dir",
            str(tmp_path / "empty"),
            "--output",
            str(out),
        ],
    )
    assert bad.exit_code == 2
    assert "suite 'commonsense'" in bad.output and "ARC-Easy" in bad.output
    assert (out / "results.json").is_file()  # the earlier result is untouched


def test_model_folder_must_hold_safetensors(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        run_suite(folder, "local", data_dir=DATA, output_dir=tmp_path / "o")
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        run_suite(folder, "local", data_dir=DATA, output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()
