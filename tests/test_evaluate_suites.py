"""Suite configuration: full coverage of the paper's tasks, and clear errors before any model."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fusellm.evaluate import multiple
from fusellm.evaluate.data import DataError, EvalDataSource
from fusellm.evaluate.runner import run_suite
from fusellm.evaluate.suites import get_suite, leaf_tasks, resolve, suites, task_manager

DATA = Path(__file__).parent / "data" / "eval"


def test_suites_declared():
    assert set(suites()) == {"bbh", "commonsense", "multipl-e", "local", "custom"}
    with pytest.raises(ValueError, match="expected one of"):
        get_suite("mmlu")


def test_bbh_covers_all_27_subtasks_of_lm_eval():
    import lm_eval.tasks

    builtin = Path(lm_eval.tasks.__file__).parent / "bbh" / "cot_fewshot" / "_bbh_cot_fewshot.yaml"
    expected = yaml.safe_load(builtin.read_text())["task"]
    leaves = leaf_tasks(task_manager("bbh"), "fusellm_bbh")
    assert len(leaves) == 27
    assert list(leaves) == expected
    resolved = resolve("bbh", EvalDataSource(data_dir=DATA))  # all 27 local files present
    assert len(resolved.tasks) == 27


def test_commonsense_tasks_and_local_overrides():
    resolved = resolve("commonsense", EvalDataSource(data_dir=DATA))
    assert resolved.tasks == ["arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa"]
    members = {m["task"]: m for m in resolved.spec["task"]}
    assert members["arc_easy"]["dataset_path"] == "json"
    assert members["arc_easy"]["dataset_kwargs"]["data_files"] == {
        "test": str(DATA / "allenai/ai2_arc/ARC-Easy/test.jsonl")
    }
    assert members["arc_easy"]["training_split"] is None  # no train file: switched off
    assert members["hellaswag"]["num_fewshot"] == 0  # group default carried to each task
    assert set(members["boolq"]["dataset_kwargs"]["data_files"]) == {"validation"}


def test_hub_source_keeps_builtin_dataset(monkeypatch):
    from fusellm.evaluate import data

    monkeypatch.setattr(data, "hub_offline", lambda: False)  # as on a machine with network
    resolved = resolve("commonsense", EvalDataSource(source="hub"))
    assert all("dataset_path" not in m for m in resolved.spec["task"])


def test_missing_local_files_named_before_model_loads(tmp_path):
    with pytest.raises(DataError) as info:
        run_suite(
            tmp_path / "no-model", "commonsense", data_dir=tmp_path, output_dir=tmp_path / "o"
        )
    message = str(info.value)
    assert "suite 'commonsense'" in message
    assert str(tmp_path / "allenai/ai2_arc/ARC-Easy/test.jsonl") in message
    assert str(tmp_path / "Rowan/hellaswag/validation.jsonl") in message
    assert not (tmp_path / "o").exists()


def test_offline_hub_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"(?s)suite 'bbh'.*offline.*--data-dir"):
        run_suite(
            tmp_path / "no-model", "bbh", data=EvalDataSource(source="hub"), output_dir=tmp_path
        )


def test_empty_cache_is_a_clear_error(tmp_path):
    with pytest.raises(
        DataError, match=r"(?s)suite 'commonsense'.*allenai/ai2_arc is not in the cache"
    ):
        resolve("commonsense", EvalDataSource(source="cache", cache_dir=tmp_path))


def test_cache_with_dataset_folder_passes(tmp_path):
    for name in (
        "allenai___ai2_arc",
        "aps___super_glue",
        "Rowan___hellaswag",
        "allenai___openbookqa",
    ):
        (tmp_path / name).mkdir()
    resolved = resolve("commonsense", EvalDataSource(source="cache", cache_dir=tmp_path))
    assert resolved.spec["task"][0]["dataset_kwargs"] == {"cache_dir": str(tmp_path)}


def test_local_suite_needs_local_data():
    with pytest.raises(DataError, match="project-local data only"):
        resolve("local", EvalDataSource(source="hub"))


def test_task_subset_and_unknown_task():
    resolved = resolve("bbh", EvalDataSource(data_dir=DATA), tasks=["bbh_cot_fewshot_navigate"])
    assert resolved.tasks == ["bbh_cot_fewshot_navigate"]
    with pytest.raises(ValueError, match="has no task"):
        resolve("bbh", EvalDataSource(data_dir=DATA), tasks=["navigate"])


def test_multiple_skips_languages_without_toolchain():
    resolved = resolve("multipl-e")  # the shipped data
    available = multiple.available_languages()
    for language, reason in available.items():
        task = f"multiple_{language}"
        if reason:
            assert resolved.skipped[task] == reason
        else:
            assert task in resolved.tasks


def test_local_source_requires_folder():
    with pytest.raises(ValueError, match="needs data_dir"):
        EvalDataSource(source="local")
