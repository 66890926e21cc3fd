"""Evaluation users shape: their own lm-eval tasks (suite `custom`), chat templates, and the
`local` suite's domains taken from the data folder. All offline, with a tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from fusion_fixtures import fusion_dict

from fusellm.config import FusionConfigError, parse_fusion_config
from fusellm.evaluate.data import DataError, EvalDataSource
from fusellm.evaluate.runner import ChatTemplateMissing, run_suite
from fusellm.evaluate.suites import CustomTasks, local_domains, resolve
from fusellm.stages.base import ModelFiles
from fusellm.stages.evaluation import evaluate_key, evaluate_unit, suite_data_identity
from fusellm.testing.tiny import save_tiny, tiny_model, train_tokenizer

DATA = Path(__file__).parent / "data" / "eval"
LOCAL = DATA / "fusellm" / "local"
# A template of the usual shape; "ASSISTANT:" marks a rendered prompt in the sample logs.
TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QUESTIONS = [
    {
        "question": f"What number follows {i}?",
        "choices": [f"{i + 1}", f"{i + 2}", f"{i}"],
        "answer": 0,
    }
    for i in range(5)
]


def _mc_task(name: str, data_file: str) -> dict:
    """A multiple-choice task over a local JSONL file (`dataset_path: json`)."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_file}},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def _bpb_task(name: str, data_file: str) -> dict:
    """A loglikelihood_rolling task (bits per byte, lower is better) over local text."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_file}},
        "output_type": "loglikelihood_rolling",
        "test_split": "test",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}
        ],
        "metadata": {"version": 1.0},
    }


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in data))
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def task_dir(tmp_path) -> Path:
    """The user's folder: two tasks with data beside them (relative paths), and a group."""
    folder = tmp_path / "my-tasks"
    _write(folder / "numbers.jsonl", QUESTIONS)
    _write(folder / "qa.yaml", _mc_task("my_qa", "numbers.jsonl"))
    (folder / "text").mkdir()
    shutil.copy(LOCAL / "docs" / "test.jsonl", folder / "text" / "prose.jsonl")
    _write(folder / "text" / "prose.yaml", _bpb_task("my_prose", "prose.jsonl"))
    _write(folder / "group.yaml", {"group": "my_group", "task": ["my_qa", "my_prose"]})
    return folder


@pytest.fixture(scope="module")
def tiny():
    texts = [
        line for path in sorted(LOCAL.rglob("*.jsonl")) for line in path.read_text().split("\n")
    ]
    tokenizer = train_tokenizer(texts, kind="spm", vocab_size=600)
    model = tiny_model("llama", tokenizer, hidden=32, layers=1, heads=2, max_positions=4096)
    return model, tokenizer


@pytest.fixture(scope="module")
def chat_tokenizer(tiny, tmp_path_factory):
    """The tiny tokenizer with a chat template (a copy: the plain one has none)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    tiny[1].save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


# ---------------------------------------------------------------- custom tasks


def test_custom_task_runs_offline(tiny, task_dir, tmp_path):
    model, tok = tiny
    out = tmp_path / "custom"
    custom = CustomTasks(("my_qa", "my_prose"), task_dir)
    result = run_suite(model, "custom", tokenizer=tok, output_dir=out, custom=custom, limit=3)
    assert list(result.metrics) == ["my_qa", "my_prose"]
    assert 0.0 <= result.metrics["my_qa"]["acc"] <= 1.0
    assert result.metrics["my_prose"]["bits_per_byte"] > 0
    assert result.n_samples == {"my_qa": 3, "my_prose": 2}  # the docs file has 2 documents
    # each named task is read by its own metric; the suite's average by acc where reported
    assert result.extra["entries"] == {
        "my_qa": {"tasks": ["my_qa"], "metric": "acc", "higher_is_better": True},
        "my_prose": {"tasks": ["my_prose"], "metric": "bits_per_byte", "higher_is_better": False},
    }
    assert result.primary_metric == "acc"
    assert result.average == result.metrics["my_qa"]["acc"]
    row = json.loads((out / "samples" / "my_qa.jsonl").read_text().splitlines()[0])
    assert row["doc"]["question"] == QUESTIONS[0]["question"]
    assert "ASSISTANT:" not in json.dumps(row["arguments"])  # no template asked for
    # data files named relative to the task YAML are read from its folder
    spec = yaml.safe_load((out / "suite_config.yaml").read_text())
    files = {m["task"]: m["dataset_kwargs"]["data_files"]["test"] for m in spec["task"]}
    assert files == {
        "my_qa": str(task_dir / "numbers.jsonl"),
        "my_prose": str(task_dir / "text" / "prose.jsonl"),
    }


def test_custom_group_expands_to_its_tasks(task_dir):
    resolved = resolve("custom", custom=CustomTasks(("my_group",), task_dir))
    assert resolved.tasks == ["my_qa", "my_prose"]
    assert resolved.entries == {"my_group": ["my_qa", "my_prose"]}
    assert resolved.include_defaults is False  # the folder had every name: no full lm-eval scan
    with pytest.raises(ValueError, match="both run my_qa"):
        resolve("custom", custom=CustomTasks(("my_group", "my_qa"), task_dir))


def test_custom_needs_its_tasks():
    with pytest.raises(ValueError, match="evaluation.tasks"):
        resolve("custom")
    with pytest.raises(ValueError, match="names no task"):
        resolve("custom", custom=CustomTasks(()))


def test_unknown_task_lists_close_matches(task_dir):
    """Against lm-eval's whole index and the user's folder, before any model is loaded."""
    with pytest.raises(ValueError) as info:
        resolve("custom", custom=CustomTasks(("arc_esy", "my_qaa"), task_dir))
    message = str(info.value)
    assert "'arc_esy' (close matches: arc_easy" in message
    assert "'my_qaa' (close matches: my_qa" in message
    assert str(task_dir) in message


def test_builtin_lm_eval_task_reads_the_data_folder():
    """A name from lm-eval's own tasks, its data in evaluation.data_dir (the Hub layout)."""
    resolved = resolve(
        "custom", EvalDataSource(data_dir=DATA), custom=CustomTasks(("arc_easy", "boolq"))
    )
    assert resolved.include_defaults is True
    members = {m["task"]: m for m in resolved.spec["task"]}
    assert members["arc_easy"]["dataset_kwargs"]["data_files"] == {
        "test": str(DATA / "allenai/ai2_arc/ARC-Easy/test.jsonl")
    }


def test_missing_task_dir_is_named(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        resolve("custom", custom=CustomTasks(("x",), tmp_path / "nowhere"))


# ---------------------------------------------------------------- chat template


def test_chat_template_renders_prompts(tiny, chat_tokenizer, task_dir, tmp_path):
    model, _ = tiny
    out = tmp_path / "chat"
    result = run_suite(
        model,
        "custom",
        tokenizer=chat_tokenizer,
        output_dir=out,
        custom=CustomTasks(("my_qa",), task_dir),
        limit=2,
        chat_template=True,
    )
    assert result.extra["chat_template"] is True
    row = json.loads((out / "samples" / "my_qa.jsonl").read_text().splitlines()[0])
    context = row["arguments"][0][0]
    assert context == f"<s>USER: {QUESTIONS[0]['question']}\nASSISTANT:"
    assert 0.0 <= result.metrics["my_qa"]["acc"] <= 1.0


def test_model_without_chat_template_fails_before_loading(tiny, task_dir, tmp_path):
    model, tok = tiny
    custom = CustomTasks(("my_qa",), task_dir)
    with pytest.raises(ChatTemplateMissing, match="fused has no chat template"):
        run_suite(
            model,
            "custom",
            tokenizer=tok,
            output_dir=tmp_path / "o",
            custom=custom,
            chat_template=True,
            label="fused",
        )
    folder = save_tiny(model, tok, tmp_path / "src-a")
    with pytest.raises(ChatTemplateMissing, match="src-a has no chat template"):
        run_suite(folder, "local", data_dir=DATA, output_dir=tmp_path / "o", chat_template=True)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the stage


def _config(tmp_path, **evaluation):
    data = fusion_dict(
        {"llama": str(tmp_path / "a"), "neox": str(tmp_path / "b")},
        str(tmp_path / "corpus.jsonl"),
        tmp_path / "work",
        "sqlite:///unused",
    )
    data["evaluation"].update(evaluation)
    return parse_fusion_config(data)


def test_config_fields(tmp_path, task_dir):
    config = _config(tmp_path, suites=["local", "custom"], tasks=["my_qa"], task_dir=str(task_dir))
    assert config.evaluation.tasks == ["my_qa"] and config.evaluation.task_dir == task_dir
    assert config.evaluation.chat_template is False
    for bad, words in (
        ({"tasks": ["my_qa"]}, "add it to suites"),
        ({"suites": ["custom"]}, "names none"),
        ({"task_dir": str(task_dir)}, "name the tasks"),
        ({"suites": ["custom"], "tasks": ["a", "a"]}, "listed twice"),
    ):
        with pytest.raises(FusionConfigError, match=words):
            _config(tmp_path, **bad)


def test_evaluate_key_follows_template_tasks_and_folder(tmp_path, task_dir):
    base = {"suites": ["local", "custom"], "tasks": ["my_qa"], "task_dir": str(task_dir)}
    config = _config(tmp_path, **base)
    key = evaluate_key("m", "fused", "custom", config)
    local = evaluate_key("m", "fused", "local", config)
    assert evaluate_key("m", "fused", "custom", config) == key  # stable
    chat = _config(tmp_path, **base, chat_template=True)
    assert evaluate_key("m", "fused", "custom", chat) != key
    assert evaluate_key("m", "fused", "local", chat) != local  # prompts of every suite
    more = _config(tmp_path, **{**base, "tasks": ["my_qa", "my_prose"]})
    assert evaluate_key("m", "fused", "custom", more) != key
    assert evaluate_key("m", "fused", "local", more) == local  # other suites keep their keys
    # the folder by content: an edited task file, then edited data, each give a new key
    (task_dir / "qa.yaml").write_text(
        (task_dir / "qa.yaml").read_text().replace("version: 1.0", "version: 2.0")
    )
    edited = evaluate_key("m", "fused", "custom", config)
    assert edited != key
    _write(task_dir / "numbers.jsonl", QUESTIONS[:3])
    assert evaluate_key("m", "fused", "custom", config) not in (key, edited)
    # the same folder elsewhere: the same content, the same data identity
    moved = tmp_path / "moved"
    shutil.copytree(task_dir, moved)
    ident = suite_data_identity("custom", None, CustomTasks(("my_qa",), task_dir))
    again = suite_data_identity("custom", None, CustomTasks(("my_qa",), moved))
    assert ident == again


def test_stage_checks_chat_template_when_planned(tiny, chat_tokenizer, tmp_path):
    """Planned evaluations name a model without a template before any suite runs; a trained
    model is judged by its target's tokenizer (its folder does not exist yet)."""
    from fusellm.io.sources import ModelRef

    model, tok = tiny
    plain = save_tiny(model, tok, tmp_path / "plain")
    chat = save_tiny(model, chat_tokenizer, tmp_path / "chat")
    config = _config(tmp_path, chat_template=True)

    def files(path: Path) -> ModelFiles:
        return ModelFiles(path.name, ModelRef(uri=str(path)), path, f"id-{path.name}", "tok")

    not_yet = tmp_path / "work" / "train" / "x" / "model"
    with pytest.raises(ChatTemplateMissing, match=r"fused \(.*plain\) has no chat template"):
        evaluate_unit(not_yet, "k", "fused", "local", config, loaded_as=files(plain))
    with pytest.raises(ChatTemplateMissing, match="plain has no chat template"):
        evaluate_unit(plain, "k", "plain", "local", config, loaded_as=files(plain))
    unit = evaluate_unit(not_yet, "k", "fused", "local", config, loaded_as=files(chat))
    assert unit.stage == "evaluate"


# ---------------------------------------------------------------- local domains


def test_local_domains_come_from_the_data_folder(tiny, tmp_path):
    data = tmp_path / "eval"
    for domain, source in (("prose", "docs"), ("sql", "code")):
        folder = data / "fusellm" / "local" / domain
        folder.mkdir(parents=True)
        shutil.copy(LOCAL / source / "test.jsonl", folder / "test.jsonl")
    assert local_domains(data) == ["prose", "sql"]
    resolved = resolve("local", EvalDataSource(data_dir=data))
    assert resolved.tasks == ["fusellm_local_prose", "fusellm_local_sql"]  # no mc data: no mc
    assert set(resolved.task_configs) == set(resolved.tasks)
    model, tok = tiny
    out = tmp_path / "local"
    result = run_suite(model, "local", tokenizer=tok, data_dir=data, output_dir=out, limit=2)
    assert list(result.metrics) == ["fusellm_local_prose", "fusellm_local_sql"]
    assert all(m["bits_per_byte"] > 0 for m in result.metrics.values())
    assert result.average == pytest.approx(
        sum(m["bits_per_byte"] for m in result.metrics.values()) / 2
    )
    made = yaml.safe_load((out / "tasks" / "fusellm_local_sql.yaml").read_text())
    assert made["dataset_name"] == "sql" and made["output_type"] == "loglikelihood_rolling"
    # a new domain's data changes the suite's identity; the demo's domains keep their order
    shutil.copytree(LOCAL / "docs", data / "fusellm" / "local" / "docs")
    resolved = resolve("local", EvalDataSource(data_dir=data))
    assert resolved.tasks == ["fusellm_local_docs", "fusellm_local_prose", "fusellm_local_sql"]
    assert "fusellm_local_docs" not in resolved.task_configs  # the package's own file


def test_local_fixed_domains_unchanged():
    resolved = resolve("local", EvalDataSource(data_dir=DATA))
    assert resolved.tasks == [
        "fusellm_local_docs",
        "fusellm_local_code",
        "fusellm_local_docstrings",
        "fusellm_local_mc",
    ]
    assert resolved.task_configs == {}


def test_local_domain_names_and_empty_folder(tmp_path):
    bad = tmp_path / "fusellm" / "local" / "my domain"
    bad.mkdir(parents=True)
    (bad / "test.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match="rename"):
        resolve("local", EvalDataSource(data_dir=tmp_path))
    with pytest.raises(DataError, match=r"fusellm/local/docs/test\.jsonl"):
        resolve("local", EvalDataSource(data_dir=tmp_path / "empty"))  # names what to provide


def test_cli_runs_custom_tasks_with_a_template(tiny, chat_tokenizer, task_dir, tmp_path):
    from typer.testing import CliRunner

    from fusellm.cli import app

    model, tok = tiny
    plain = save_tiny(model, tok, tmp_path / "plain")
    chat = save_tiny(model, chat_tokenizer, tmp_path / "chat")
    out = tmp_path / "out"
    args = ["eval", "--suite", "custom", "--task", "my_qa", "--task-dir", str(task_dir)]
    args += ["--output", str(out), "--limit", "2", "--chat-template"]
    done = CliRunner().invoke(app, [*args, "--model", str(chat)])
    assert done.exit_code == 0, done.output
    row = json.loads((out / "samples" / "my_qa.jsonl").read_text().splitlines()[0])
    assert row["arguments"][0][0].endswith("ASSISTANT:")
    refused = CliRunner().invoke(app, [*args, "--model", str(plain)])
    assert refused.exit_code == 2 and "plain has no chat template" in refused.output


def test_a_config_file_names_its_task_folder_relative_to_itself(task_dir, tmp_path):
    """`fusellm validate`/`run` read `task_dir` beside the config, and the custom suite's
    tasks are found there (no error for a valid config)."""
    from fusellm.cli.validate import validate

    data = fusion_dict({"llama": "m", "neox": "m"}, "corpus", Path("work"), "sqlite:///x.db")
    data["evaluation"].update(
        suites=["local", "custom"],
        tasks=["my_qa"],
        task_dir=task_dir.name,  # relative: beside the config file
        data_dir=str(DATA),
    )
    path = task_dir.parent / "fusion.yaml"
    path.write_text(yaml.safe_dump(data))
    config, found = validate(path)
    assert config is not None and config.evaluation.task_dir == task_dir
    assert not [e for e in found.errors if "evaluation" in e], found.errors
