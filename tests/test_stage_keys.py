"""Stage keys recompute exactly what a change affects: one parametrised case per config field.

A tiny fusion runs once through the library walk (with MLflow, so registration is part of it).
Then each case changes one field and asks the plan which stage units would run: the answer must
be exactly the stages that depend on the field. Every leaf field of `FusionConfig` must have a
case or a stated reason, so a new field cannot slip past its key. The plan and the run walk the
same code (`fusellm.stages.pipeline`); the last tests check that a real re-run computes exactly
what the plan announced.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from fusion_fixtures import EVAL_DATA, build_models, corpus_texts, fusion_dict, write_corpus

from fusellm.config import FusionConfig, parse_fusion_config
from fusellm.stages import pipeline

pytestmark = pytest.mark.timeout(600)

P = {"pieces"}
E_LLAMA = {"extract-llama", "store-llama"}
E_NEOX = {"extract-neox", "store-neox"}
E_TARGET = {"extract-target", "store-target"}
FUSED = {"fuse", "fused-data", "train-fused", "evaluate-fused-local", "compare", "register"}
BASELINE = {"train-baseline", "evaluate-baseline-local", "compare", "register"}
TRAINED = (FUSED | BASELINE) - {"fuse", "fused-data"}  # what a training field touches
AFTER_PIECES = E_LLAMA | E_NEOX | FUSED | BASELINE
EVERY_EVAL = {f"evaluate-{m}-local" for m in ("fused", "baseline", "llama", "neox")}

# field path -> (new value, the stage units that must recompute)
CASES: dict[str, tuple[object, set[str]]] = {
    "name": ("renamed", set()),
    "target.name": ("the-target", set()),
    "target.dtype": ("float32", E_TARGET | FUSED | BASELINE),
    "target.trust_remote_code": (True, E_TARGET | FUSED | BASELINE),
    "sources[1].dtype": ("float32", E_NEOX | FUSED | {"evaluate-neox-local"}),
    "sources[1].trust_remote_code": (True, E_NEOX | FUSED | {"evaluate-neox-local"}),
    "sources[1].name": ("neo", {"evaluate-neo-local"} | FUSED),
    "target.document_start": ("none", E_TARGET | FUSED | BASELINE),
    "target.document_end": ("</s>", E_TARGET | FUSED | BASELINE),
    "sources[1].document_start": ("none", E_NEOX | FUSED | {"evaluate-neox-local"}),
    "sources[0].dtype": ("float32", E_LLAMA | FUSED | {"evaluate-llama-local"}),
    "corpus.limit": (10, P | AFTER_PIECES),
    "pieces.block_size": (80, P | AFTER_PIECES),
    "pieces.margin": (10, P | AFTER_PIECES),
    "pieces.workers": (2, set()),
    "extraction.top_k": (3, E_LLAMA | E_NEOX | FUSED),
    "extraction.shard_size": (7, P | AFTER_PIECES),
    "extraction.token_ce": (False, E_LLAMA | E_NEOX | FUSED),
    "extraction.batch_size": (2, set()),
    "extraction.device": ("auto", set()),
    "alignment.method": ("dtw", FUSED),
    "fusion.method": ("avg_ce", FUSED),
    "fusion.granularity": ("token", FUSED),
    "fusion.ce_unit": ("token", FUSED),
    "fusion.vocab_map": ("mined", {"vocab-map-llama", "vocab-map-neox"} | FUSED),
    "fusion.next_token": ("target", FUSED),
    "fusion.workers": (2, set()),
    "training.lam": (0.5, {"train-fused", "evaluate-fused-local", "compare", "register"}),
    "training.temperature": (2.0, {"train-fused", "evaluate-fused-local", "compare", "register"}),
    "training.rest_bucket": (True, {"train-fused", "evaluate-fused-local", "compare", "register"}),
    "training.learning_rate": (2e-3, TRAINED),
    "training.lr_scheduler": ("linear", TRAINED),
    "training.warmup_ratio": (0.1, TRAINED),
    "training.adam_betas": ([0.8, 0.9], TRAINED),
    "training.adam_eps": (1e-6, TRAINED),
    "training.weight_decay": (0.0, TRAINED),
    "training.max_grad_norm": (0.5, TRAINED),
    "training.optimizer": ("deepspeed", TRAINED),
    "training.global_batch": (8, TRAINED),
    "training.max_length": (48, TRAINED),
    "training.epochs": (2, TRAINED),
    "training.max_steps": (5, TRAINED),
    "training.seed": (7, TRAINED),
    "training.bf16": (True, TRAINED),
    "training.deepspeed": ({"steps_per_print": 10}, TRAINED),
    "training.trust_remote_code": (True, TRAINED),
    "training.checkpoint_every": (3, set()),
    "training.keep_checkpoints": (3, set()),
    "training.micro_batch": (1, set()),
    "training.zero_stage": (2, set()),
    "training.gradient_checkpointing": (True, set()),
    "training.rendezvous": ("127.0.0.1:29400", set()),  # where the nodes meet
    "training.rendezvous_timeout": (60, set()),
    "evaluation.limit": (1, EVERY_EVAL | {"compare", "register"}),
    "evaluation.max_gen_toks": (16, EVERY_EVAL | {"compare", "register"}),
    "evaluation.batch_size": (4, set()),
    "evaluation.backend": ("vllm", EVERY_EVAL | {"compare", "register"}),
    "extraction.shards_per_part": (3, set()),  # how extraction is cut into flow runs
    "part_attempts": (5, set()),
    "evaluation.suites": (
        ["local", "commonsense"],
        {f"evaluate-{m}-commonsense" for m in ("fused", "baseline", "llama", "neox")}
        | {"compare"},
    ),
    "tracking.experiment": ("another", set()),
    "tracking.registered_model": ("another-name", {"register"}),
    "tracking.lower_is_better": (False, {"register"}),
    "planning.corpus_tokens": (1e6, set()),
    "execution": ("deployments", set()),  # where stages run, not what they compute
}

# field path -> why no single-field case applies
NOT_CASES = {
    "target.uri": "another model: covered by test_changed_source_recomputes_what_the_plan_said",
    "sources[0].uri": "another model: as target.uri",
    "sources[1].uri": "another model: as target.uri",
    "sources[0].name": "names the target's twin; as sources[1].name",
    "sources[0].trust_remote_code": "as sources[1].trust_remote_code",
    "sources[0].document_start": "as sources[1].document_start",
    "sources[0].document_end": "as sources[1].document_start",
    "sources[1].document_end": "as target.document_end, for a source",
    "target.endpoint_url": "where an S3 model lives, not what it is: its ETags are the identity",
    "sources[0].endpoint_url": "as target.endpoint_url",
    "sources[1].endpoint_url": "as target.endpoint_url",
    "corpus.uri": "another corpus: its content hash is the identity (test_corpus.py)",
    "corpus.endpoint_url": "as target.endpoint_url",
    "corpus.text_field": "another field of the same files: as corpus.limit, needs other data",
    "corpus.split": "Hub datasets only",
    "corpus.format": "conversations need a chat corpus and templates: tests/test_chat.py",
    "corpus.messages_field": "chat corpora only: as corpus.text_field",
    "target.chat_template": "read for chat corpora only, where it keys the pieces: "
    "test_changing_a_chat_template_recuts_the_conversations",
    "sources[0].chat_template": "as target.chat_template",
    "sources[1].chat_template": "as target.chat_template",
    "training.sources": "set by the train stage from the source names",
    "training.nodes": "needs training.rendezvous too; in no key (test_training_nodes.py)",
    "evaluation.data_dir": "by content: test_evaluation_data_counts_by_content",
    "evaluation.sources": "changes which models are evaluated, not a key",
    "evaluation.baseline": "changes whether the baseline exists, not a key",
    "tracking.primary_suite": "must name an evaluated suite; local is the only one here",
    "tracking.tracking_uri": "another registry: a key of register, but another database here",
    "tracking.register_model": "changes whether registration exists, not a key",
    "workdir": "a new work folder starts empty",
    "fusion.mode": "changes which fuse and train units exist: tests/test_pairwise.py",
    "planning.parameters": "a mapping of size hints for `fusellm plan`; read by no stage",
    "evaluation.tasks": "needs custom in evaluation.suites: test_custom_tasks_key_their_suite",
    "evaluation.task_dir": "needs evaluation.tasks: test_custom_tasks_key_their_suite",
    "evaluation.chat_template": "the tiny models have no chat template, an error when planned; "
    "the key: tests/test_evaluate_custom.py",
}
# Keys of the merge stage, which runs with pairwise fusion, not in this fixture; each one's
# effect on that key is in tests/test_merge.py (test_the_key_follows_the_merge_and_nothing_else).
NOT_CASES |= {
    f"merge.{name}": "a key of the merge stage, which this fixture does not run"
    for name in (
        "method", "select_topk", "density", "weight", "scale", "normalize", "seed", "dtype"
    )
}  # fmt: skip


def _leaf_paths(value, prefix: str = "") -> list[str]:
    if isinstance(value, dict) and value and not prefix.endswith("deepspeed"):
        return [p for k, v in value.items() for p in _leaf_paths(v, f"{prefix}.{k}" if prefix else k)]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [p for i, v in enumerate(value) for p in _leaf_paths(v, f"{prefix}[{i}]")]
    return [prefix]


def _with(data: dict, path: str, value) -> dict:
    data = _copy(data)
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    node = data
    for part in parts[:-1]:
        node = node[int(part[1:-1])] if part.startswith("[") else node.setdefault(part, {})
    node[parts[-1]] = value
    return data


def _copy(data):
    if isinstance(data, dict):
        return {k: _copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_copy(v) for v in data]
    return data


def _pending(config: FusionConfig) -> set[str]:
    """The units a run would compute, shard numbers folded into one name per model."""
    return {
        re.sub(r"-shard-(\d+|all)$", "", u.label) for u in pipeline.plan(config).pending()
    }


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """A finished tiny fusion (registered in MLflow) and its config as data."""
    from fusellm import tracking

    root = tmp_path_factory.mktemp("keys")
    texts = corpus_texts()
    models = build_models(root / "models", texts)
    corpus = write_corpus(root / "corpus", texts)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    data = fusion_dict({k: str(v) for k, v in models.items()}, str(corpus), root / "work", uri)
    data["training"].update(max_steps=4, checkpoint_every=4)
    config = parse_fusion_config(data)
    with tracking.fusion_run("keys", experiment="keys", tracking_uri=uri):
        done = pipeline.walk(config, pipeline.Executor(pipeline.MlflowTracker()))
    assert done.registration is not None and done.registration.info["version"] == 1
    return data, models, root


def test_every_field_has_a_case_or_a_reason(fused):
    data, _, _ = fused
    paths = set(_leaf_paths(parse_fusion_config(data).model_dump(mode="json")))
    assert paths == set(CASES) | set(NOT_CASES), (
        sorted(paths - set(CASES) - set(NOT_CASES)),
        sorted((set(CASES) | set(NOT_CASES)) - paths),
    )


def test_an_unchanged_config_recomputes_nothing(fused):
    data, _, _ = fused
    assert _pending(parse_fusion_config(data)) == set()


@pytest.mark.parametrize("path", sorted(CASES))
def test_one_field_recomputes_exactly_its_dependents(fused, path):
    data, _, _ = fused
    value, expected = CASES[path]
    config = parse_fusion_config(_with(data, path, value))
    assert _pending(config) == expected


def test_evaluation_data_counts_by_content(fused, tmp_path):
    """A copy of the data elsewhere is the same data; an edited file is new data."""
    data, _, _ = fused
    copy = tmp_path / "eval"
    shutil.copytree(EVAL_DATA, copy)
    assert _pending(parse_fusion_config(_with(data, "evaluation.data_dir", str(copy)))) == set()
    docs = copy / "fusellm" / "local" / "docs" / "test.jsonl"
    docs.write_text(docs.read_text() + '{"text": "one more held-out document"}\n')
    changed = parse_fusion_config(_with(data, "evaluation.data_dir", str(copy)))
    assert _pending(changed) == EVERY_EVAL | {"compare", "register"}


def test_custom_tasks_key_their_suite(fused, tmp_path):
    """The user's tasks (suite custom) are evaluated on every model, and by the content of
    their folder; nothing else recomputes (local stays the primary suite)."""
    data, _, _ = fused
    folder = tmp_path / "tasks"
    folder.mkdir()
    docs = EVAL_DATA / "fusellm" / "local" / "docs" / "test.jsonl"
    (folder / "prose.yaml").write_text(
        "task: my_prose\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "output_type: loglikelihood_rolling\ntest_split: test\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
    )
    data = _with(data, "evaluation.suites", ["local", "custom"])
    data = _with(data, "evaluation.tasks", ["my_prose"])
    data = _with(data, "evaluation.task_dir", str(folder))
    every_custom = {f"evaluate-{m}-custom" for m in ("fused", "baseline", "llama", "neox")}
    assert _pending(parse_fusion_config(data)) == every_custom | {"compare"}
    before = pipeline.plan(parse_fusion_config(data)).pending()
    (folder / "prose.yaml").write_text((folder / "prose.yaml").read_text() + "metadata: {}\n")
    after = pipeline.plan(parse_fusion_config(data)).pending()
    assert {u.label for u in after} == {u.label for u in before}
    assert {u.key for u in after}.isdisjoint(u.key for u in before)


def test_alignment_method_reaches_training_in_a_real_run(fused):
    """The cache once ignored alignment.method; a run must recompute what the plan says."""
    data, _, _ = fused
    config = parse_fusion_config(_with(data, "tracking.register_model", False))
    config = parse_fusion_config(_with(config.model_dump(mode="json"), "alignment.method", "dtw"))
    planned = _pending(config)
    ex = pipeline.Executor()
    pipeline.walk(config, ex)
    shards = len(ex.tally.states["fuse"])
    assert ex.tally.computed() == {
        "resolve-sources": 1,
        "fetch-model": 3,
        "pieces": 0,
        "extract": 0,
        "store": 0,
        "vocab": 0,
        "fuse": shards,
        "fused": 1,
        "train": 1,
        "evaluate": 1,
        "compare": 1,
    }
    assert planned == {"fuse", "fused-data", "train-fused", "evaluate-fused-local", "compare"}
    assert _pending(config) == set()


def test_changed_source_recomputes_what_the_plan_said(fused):
    from fusion_fixtures import reseed_model

    data, models, _ = fused
    config = parse_fusion_config(_with(data, "tracking.register_model", False))
    reseed_model(models["neox"], seed=11)
    planned = _pending(config)
    assert planned == E_NEOX | (FUSED - {"register"}) | {"evaluate-neox-local"}
    ex = pipeline.Executor()
    pipeline.walk(config, ex)
    shards = ex.tally.states["extract"].count("Completed")  # the retrained source's shards
    assert shards >= 2 and ex.tally.states["extract"].count("Cached") == shards  # the target's
    computed = {k: v for k, v in ex.tally.computed().items() if v}
    assert computed == {
        "resolve-sources": 1,
        "fetch-model": 3,
        "extract": shards,
        "store": 1,
        "fuse": shards,
        "fused": 1,
        "train": 1,
        "evaluate": 2,
        "compare": 1,
    }
    assert _pending(config) == set()


def test_deleting_the_work_folder_recomputes_it(fused, tmp_path):
    data, _, _ = fused
    data = _with(_with(data, "workdir", str(tmp_path / "work")), "tracking.register_model", False)
    config = parse_fusion_config(data)
    first = pipeline.Executor()
    pipeline.walk(config, first, until="extract")
    shutil.rmtree(tmp_path / "work")
    again = pipeline.Executor()
    pipeline.walk(config, again, until="extract")
    assert again.tally.computed() == first.tally.computed()
    assert all(s == "Completed" for s in again.tally.states["extract"])
    assert Path(tmp_path / "work" / "pieces").is_dir()


def test_prefect_caches_nothing_itself():
    """The stage folder is the only cache: every task has Prefect's cache off, so no second
    key exists to drift from the stage's (one once forgot `alignment.method`), and a deleted
    work folder is rebuilt instead of being answered from Prefect's result store."""
    from prefect import Task
    from prefect.cache_policies import NO_CACHE

    import fusellm_tasks.stages as tasks

    found = [v for v in vars(tasks).values() if isinstance(v, Task)]
    assert found and all(t.cache_policy is NO_CACHE for t in found)
    assert all(t.with_options(name="x").cache_policy is NO_CACHE for t in found)
