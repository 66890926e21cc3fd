"""`fusellm demo` end to end on a tiny recipe, its report, and the real 7B recipe file.

The tiny recipe has the demo's real shape (three sources of three architectures and tokenizers,
the mixed fusion corpus, the `fuse` flow with Prefect and MLflow, the CLM baseline, the `local`
suite on held-out text) with models of a few thousand parameters and two training steps, so it
checks the plumbing and the report, not the method's gains (docs/demo-recipe.md measures those).
Determinism: a second run into a fresh folder recomputes every stage after the cached sources
(extraction, fusion, both trainings, evaluation) and must write the same report.json.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
SOURCES = ["llama-docs", "neox-code", "gpt2-docstrings"]


def _tiny_sources(context: int = 128):
    from fusellm.demo.data import DemoSplits
    from fusellm.demo.sources import DemoSourcesRecipe, SourceRecipe

    small = {
        "hidden": 16,
        "layers": 1,
        "heads": 2,
        "context": context,
        "steps": 2,
        "batch_size": 2,
        "warmup_steps": 0,
        "tokenizer_bytes": 20_000,
    }
    mixes = [{"docs": 0.9, "code": 0.1}, {"code": 0.9, "docs": 0.1}, {"docstrings": 1.0}]
    specs = zip(SOURCES, ["llama", "gpt_neox", "gpt2"], ["spm", "bytelevel", "bytelevel"], mixes)
    return DemoSourcesRecipe(
        sources=tuple(
            SourceRecipe(name=n, architecture=a, tokenizer=t, vocab_size=400, mix=m, **small)
            for n, a, t, m in specs
        ),
        data=DemoSplits(),
        train_bytes=30_000,
    )


def _tiny_recipe(block_size: int = 128):
    from fusellm.demo.recipe import DemoRecipe

    return DemoRecipe(
        fusion_bytes=4_000, block_size=block_size, margin=4, steps=2, batch=2, lam=0.9
    )


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect")
    settings = {PREFECT_HOME: home, PREFECT_LOCAL_STORAGE_PATH: home / "storage"}
    with temporary_settings(settings), prefect_test_harness(server_startup_timeout=120):
        yield home


@contextlib.contextmanager
def _embedded_environment(home: Path):
    """The embedded defaults (MLflow on SQLite under `home`...) in os.environ, then as before;
    PREFECT_HOME stays the test harness's."""
    from fusellm.settings import embedded_defaults

    saved = {k: os.environ.get(k) for k in embedded_defaults(home)}
    os.environ.update({k: v for k, v in embedded_defaults(home).items() if k != "PREFECT_HOME"})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def demo_runs(harness, tmp_path_factory):
    """Two tiny demos with the same seed, each in its own folder, sharing the source cache."""
    from fusellm.demo.run import run_demo
    from fusellm_flows.fuse import fuse

    root = tmp_path_factory.mktemp("demo")
    home = root / "home"
    with _embedded_environment(home):
        reports = [
            run_demo(
                fuse,
                root / name,
                recipe=_tiny_recipe(),
                sources_recipe=_tiny_sources(),
                cache_dir=root / "cache",
                home=home,
                progress=False,
            )
            for name in ("first", "second")
        ]
    return root, reports


def test_demo_writes_the_report(demo_runs):
    root, (report, _) = demo_runs
    out = root / "first"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report
    assert set(report) == {
        "fused",
        "baseline",
        "sources",
        "primary_metric",
        "metrics",
        "baseline_margin",
        "protocol",
    }
    margin = (
        report["metrics"]["baseline"]["bits_per_byte"] - report["metrics"]["fused"]["bits_per_byte"]
    )
    assert report["baseline_margin"]["bits_per_byte"] == pytest.approx(margin, abs=1e-6)
    assert report["fused"] == "fused" and report["baseline"] == "baseline"
    assert report["sources"] == SOURCES
    assert report["primary_metric"] == "bits_per_byte"
    assert list(report["metrics"]) == [*SOURCES, "baseline", "fused"]
    for name, row in report["metrics"].items():
        domains = [row[f"bits_per_byte/{d}"] for d in ("docs", "code", "docstrings")]
        assert all(0 < v < 20 for v in domains), (name, row)
        assert row["bits_per_byte"] == pytest.approx(sum(domains) / 3, abs=1e-5)
        assert 0 <= row["acc/mc"] <= 1
    md = (out / "report.md").read_text()
    assert all(f"| {name} |" in md for name in report["metrics"])
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = (out / "config.yaml").read_text()
    assert "lam: 0.9" in config and "llama-docs" in config
    mc = (out / "data" / "eval" / "fusellm" / "local" / "mc" / "test.jsonl").read_text()
    question = json.loads(mc.splitlines()[0])
    assert question["choices"][question["answer"]] not in question["question"]
    assert not list(out.rglob(".report.*"))  # no temporary file left behind


def test_demo_same_seed_same_report(demo_runs):
    root, (first, second) = demo_runs
    assert first == second
    assert (root / "first" / "report.json").read_bytes() == (
        root / "second" / "report.json"
    ).read_bytes()
    # Not just the same cache: the second run trained its own models.
    assert list((root / "second" / "work" / "train").iterdir())


def test_demo_recorded_in_mlflow(demo_runs):
    from mlflow import MlflowClient

    root, _ = demo_runs
    from fusellm.settings import sqlite_uri

    client = MlflowClient(tracking_uri=sqlite_uri(root / "home" / "mlflow.db"))
    experiment = client.get_experiment_by_name("fusellm-demo")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.mlflow.runName = 'fusellm-demo'"
    )
    assert len(runs) == 2


def test_report_rejects_missing_model():
    from fusellm.demo.report import build_report

    with pytest.raises(ValueError, match="no metrics for \\['baseline'\\]"):
        build_report("fused", "baseline", ["a"], {"a": {}, "fused": {}})


def test_report_verdict_and_markdown(tmp_path):
    from fusellm.demo.report import build_report, markdown, model_metrics, verdict, write_report

    tasks = {
        "fusellm_local_docs": {"bits_per_byte": 2.0},
        "fusellm_local_code": {"bits_per_byte": 3.0},
        "fusellm_local_mc": {"acc": 0.5, "acc_norm": 0.25},
    }
    row = model_metrics(tasks)
    assert row == {
        "bits_per_byte": 2.5,
        "bits_per_byte/docs": 2.0,
        "bits_per_byte/code": 3.0,
        "acc/mc": 0.5,
        "acc_norm/mc": 0.25,
    }
    better = {k: v - 0.1 if k.startswith("bits") else v for k, v in row.items()}
    report = build_report("f", "b", ["s"], {"s": row, "b": row, "f": better})
    assert verdict(report)["fused_wins"] is True
    assert "beats every source" in markdown(report)
    worse = build_report("f", "b", ["s"], {"s": better, "b": row, "f": row})
    assert verdict(worse)["fused_wins"] is False
    assert "does NOT beat" in markdown(worse)
    assert report["baseline_margin"]["bits_per_byte"] == pytest.approx(0.1)
    assert "acc/mc" not in report["baseline_margin"]
    sd = report["protocol"]["paired_difference"]["sd"]
    assert report["protocol"]["margin_exceeds_two_sd"] is (0.1 > 2 * sd)
    assert report["protocol"]["applies"] is None
    assert "+0.1000 bits/byte better than the baseline" in markdown(report)
    assert report["protocol"]["command"] in markdown(report)
    paths = write_report(report, tmp_path)
    assert json.loads(paths["json"].read_text()) == report
    with pytest.raises(ValueError, match="no task reports bits_per_byte"):
        model_metrics({"fusellm_local_mc": {"acc": 1.0}})


def test_report_says_whether_the_recorded_spread_is_this_recipes():
    from fusellm.demo.recipe import DEFAULT_DEMO_RECIPE, DEFAULT_RECIPE_PROTOCOL
    from fusellm.demo.report import build_report, markdown

    row = {"bits_per_byte": 2.5, "bits_per_byte/docs": 2.5}
    better = {k: v - 1e-6 for k, v in row.items()}
    ours = build_report(
        "f", "b", ["s"], {"s": row, "b": row, "f": better}, recipe=DEFAULT_DEMO_RECIPE
    )
    assert ours["protocol"]["applies"] is True
    assert ours["protocol"]["margin_exceeds_two_sd"] is False  # 1e-6 is inside the noise
    assert "does NOT exceed twice that sd" in markdown(ours)
    other = DEFAULT_DEMO_RECIPE.model_copy(update={"steps": 3})
    theirs = build_report("f", "b", ["s"], {"s": row, "b": row, "f": better}, recipe=other)
    assert theirs["protocol"]["applies"] is False and "not its own" in markdown(theirs)
    assert DEFAULT_RECIPE_PROTOCOL["recipe"] == DEFAULT_DEMO_RECIPE.model_dump()
    assert len(DEFAULT_RECIPE_PROTOCOL["seeds"]) >= 3 and DEFAULT_RECIPE_PROTOCOL["part"] == "test"
    diff = DEFAULT_RECIPE_PROTOCOL["difference"]
    assert -diff["mean"] > 2 * diff["sd"] > 0  # the default recipe's recorded win


def test_continuation_questions_are_deterministic():
    from fusellm.demo.run import continuation_questions

    texts = [f"doc {d}\n" + "\n".join(f"line {d}-{i} of text" for i in range(8)) for d in range(6)]
    first = continuation_questions(texts, n=5)
    assert first == continuation_questions(list(texts), n=5)
    assert len(first) == 5
    for q in first:
        right = q["choices"][q["answer"]]
        context_doc = q["question"].split("line ")[1].split("-")[0]
        assert right.startswith(f"line {context_doc}-")
        assert len(set(q["choices"])) == 4
        assert all(not c.startswith(f"line {context_doc}-") for c in q["choices"] if c != right)


def test_7b_recipe_parses():
    from fusellm.config import load_fusion_config

    config = load_fusion_config(REPO / "configs" / "fusellm-7b.yaml")
    assert config.target.uri == "hf://meta-llama/Llama-2-7b-hf"
    assert [s.uri for s in config.sources] == [
        "hf://meta-llama/Llama-2-7b-hf",
        "hf://openlm-research/open_llama_7b_v2",
        "hf://mosaicml/mpt-7b",
    ]
    assert [s.trust_remote_code for s in config.sources] == [False, False, True]
    assert config.corpus.uri == "hf://datasets/JeanKaddour/minipile"
    assert (config.pieces.block_size, config.extraction.top_k) == (2048, 10)
    t = config.training
    assert (t.lam, t.learning_rate, t.lr_scheduler, t.warmup_ratio) == (0.9, 1e-5, "cosine", 0.008)
    assert (t.adam_betas, t.weight_decay, t.max_grad_norm) == ((0.9, 0.95), 0.1, 1.0)
    assert (t.global_batch, t.epochs, t.bf16, t.zero_stage) == (128, 1, True, 2)
    assert config.evaluation.suites == ["bbh", "commonsense", "multipl-e"]


def test_chat_demo_fuses_pairwise_on_conversations_and_merges(demo_runs):
    """`fusellm demo --chat`: the same sources as chat models, one pairwise fusion per source
    besides the target on the demo conversations, the merge as the fused model, its report."""
    from fusellm.data.store import open_topk
    from fusellm.demo.run import run_demo
    from fusellm_flows.fuse import fuse

    root, _ = demo_runs
    home = root / "home"
    with _embedded_environment(home):
        # Conversations are whole: sources with a window of 384 (the tiny tokenizers spend
        # about a token per character).
        report = run_demo(fuse, root / "chat", recipe=_tiny_recipe(384),
                          sources_recipe=_tiny_sources(384), cache_dir=root / "cache", home=home,
                          progress=False, chat=True)  # fmt: skip
    assert list(report["metrics"]) == [*SOURCES, "baseline", "fused"]
    work = root / "chat" / "work"
    merged = [json.loads(p.read_text()) for p in work.glob("merge/*/stage.json")]
    assert len(merged) == 1 and merged[0]["info"]["method"] == "task_arithmetic"
    assert len(merged[0]["info"]["models"]) == 2  # the two sources besides the target
    pieces = json.loads(next(work.glob("pieces/*/stage.json")).read_text())["info"]
    assert pieces["pieces"] >= 8 and pieces["dropped_long"] < pieces["texts"] / 2
    for fused in work.glob("fused/*/store"):  # each pair's fused data: conversations
        store = open_topk(fused)
        assert store.meta["chat"] is True and store[0].trained.any()
    config = (root / "chat" / "config.yaml").read_text()
    assert "format: chat" in config and "mode: pairwise" in config
    assert report["protocol"]["applies"] is None  # the recorded spread is the text demo's
