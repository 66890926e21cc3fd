"""`fusellm demo`: a real miniature FuseLLM on a laptop CPU, through the same `fuse` flow.

Steps, each shown as it runs:

1. build (or reuse from the cache) the three tiny sources (`fusellm.demo.sources`);
2. write the fusion corpus (each domain's ``fusion`` split, `DemoRecipe.fusion_bytes`) as JSONL
   and the `local` evaluation suite's data: each domain's held-out text for bits per byte, and a
   multiple-choice task built from the same held-out text;
3. write ``<out>/config.yaml``, a `FusionConfig` with the recipe of `fusellm.demo.recipe`
   (target = the Llama-style source, all three sources, λ = 0.9, the CLM baseline at λ = 1);
4. run the Prefect `fuse` flow on it, under the embedded defaults, so Prefect and MLflow record
   the run like any other fusion;
5. write ``report.json``, ``report.md`` and ``report.png`` (`fusellm.demo.report`) and print
   where they are and the commands that open the Prefect and MLflow UIs on these runs.

Everything is seeded: two runs with the same seed write the same report.json.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml

from fusellm.config import FusionConfig
from fusellm.demo.recipe import DEFAULT_DEMO_RECIPE, DemoRecipe
from fusellm.io.files import write_text_atomic

MC_PER_DOMAIN = 40  # multiple-choice questions per domain
MC_CHOICES = 4
MC_CONTEXT_LINES = 3
MC_LINE_CHARS = (8, 80)  # lines used as context or answers: not trivial, and short enough that
# an answer fits the smallest model window (lm-eval refuses continuations longer than that)
_MC_SALT = b"fusellm-demo-mc-v1\0"


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _rank(*parts: str) -> str:
    """A fixed pseudo-random order key: the same text always sorts to the same place."""
    return hashlib.sha256(_MC_SALT + "\0".join(parts).encode("utf-8")).hexdigest()


def continuation_questions(
    texts: list[str], n: int = MC_PER_DOMAIN, choices: int = MC_CHOICES
) -> list[dict]:
    """Questions "which line comes next?" from held-out documents, deterministic.

    For each document with enough lines, the question is `MC_CONTEXT_LINES` lines of it and the
    right answer the line that follows; the wrong answers are lines of other documents of the
    same domain. Which position, which distractors and where the answer goes are all fixed by
    hashes of the text, so the task never changes between runs or machines.
    """
    low, high = MC_LINE_CHARS
    lines_of = [[ln for ln in t.splitlines() if low <= len(ln.strip()) <= high] for t in texts]
    pool = sorted({ln for lines in lines_of for ln in lines}, key=lambda ln: _rank("pool", ln))
    out = []
    for lines in lines_of:
        if len(lines) <= MC_CONTEXT_LINES or len(out) >= n:
            continue
        positions = range(MC_CONTEXT_LINES, len(lines))
        at = min(positions, key=lambda i: _rank("at", lines[i - 1], lines[i]))
        answer = lines[at]
        own = set(lines)
        wrong = [ln for ln in pool if ln not in own][: choices - 1]
        if len(wrong) < choices - 1:
            continue
        options = sorted([answer, *wrong], key=lambda ln: _rank("order", answer, ln))
        out.append(
            {
                "question": "\n".join(lines[at - MC_CONTEXT_LINES : at]),
                "choices": options,
                "answer": options.index(answer),
            }
        )
        pool = pool[choices - 1 :] + pool[: choices - 1]  # other distractors for the next one
    return out


def write_eval_data(folder: Path, max_bytes: int | None = None) -> dict[str, int]:
    """The `local` suite's data under ``folder/fusellm/local``: held-out text and questions
    (`max_bytes` of text per domain; default: the demo's)."""
    from fusellm.demo.recipe import HELDOUT_BYTES, heldout_texts

    texts = heldout_texts(max_bytes=max_bytes or HELDOUT_BYTES)
    root = folder / "fusellm" / "local"
    counts, questions = {}, []
    for domain, docs in texts.items():
        if not docs:
            raise ValueError(f"the {domain!r} domain has no held-out documents")
        write_text_atomic(root / domain / "test.jsonl", _jsonl([{"text": t} for t in docs]))
        counts[domain] = len(docs)
        questions += continuation_questions(docs)
    write_text_atomic(root / "mc" / "test.jsonl", _jsonl(questions))
    counts["mc"] = len(questions)
    return counts


def write_corpus(path: Path, recipe: DemoRecipe) -> int:
    """The fusion corpus as JSONL (one document per line, field ``text``)."""
    from fusellm.demo.recipe import fusion_texts

    texts = fusion_texts(recipe)
    write_text_atomic(path, _jsonl([{"text": t} for t in texts]))
    return len(texts)


def demo_config(
    recipe: DemoRecipe, sources: dict[str, Path], *, corpus: Path, eval_dir: Path, workdir: Path
) -> dict:
    """The demo's `FusionConfig` as plain data (what config.yaml holds)."""
    if recipe.target not in sources:
        raise ValueError(f"target {recipe.target!r} is not one of the sources {sorted(sources)}")
    return {
        "name": "fusellm-demo",
        "target": {"uri": str(sources[recipe.target]), "name": recipe.target},
        "sources": [{"uri": str(path), "name": name} for name, path in sources.items()],
        "corpus": {"uri": str(corpus)},
        "pieces": {"block_size": recipe.block_size, "margin": recipe.margin},
        "extraction": {"top_k": recipe.top_k, "batch_size": 8, "device": "cpu"},
        "fusion": {
            "method": recipe.method,
            "granularity": recipe.granularity,
            "ce_unit": recipe.ce_unit,
            "next_token": recipe.next_token,
        },
        "training": recipe.train_fields(recipe.lam),
        "evaluation": {"suites": ["local"], "data_dir": str(eval_dir), "batch_size": 8},
        "tracking": {"experiment": "fusellm-demo", "registered_model": "fusellm-demo-fused"},
        "workdir": str(workdir),
    }


# The tiny sources' tokenizers have no chat template: the demo gives them a ChatML-like one
# (role lines, each turn closed by the tokenizer's EOS). Real instruct models bring their own;
# the Gemma base checkpoint gets Gemma's (`fusellm.demo.real.GEMMA_CHAT_TEMPLATE`).
DEMO_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def write_chat_corpus(folder: Path, recipe: DemoRecipe) -> int:
    """The chat demo's corpus: the demo conversations' ``fusion`` split, up to the recipe's
    fusion bytes over all domains, each short enough for the sources' window (a character a
    token: the tiny sources' tokenizers have a few hundred entries)."""
    from fusellm.demo.chat import conversations
    from fusellm.demo.chat import write_chat_corpus as write

    convs = conversations("fusion", max_bytes=recipe.fusion_bytes * 3, max_chars=recipe.block_size)
    write(folder, convs)
    return len(convs)


def chat_config(raw: dict, corpus: Path, real: bool) -> dict:
    """The demo's config as a FuseChat: conversations, a template for every model that lacks
    one, pairwise fusion onto the target, then the merge: task arithmetic, which the chat
    protocol preferred at this scale to SCE's default selection (docs/fusechat.md)."""
    from fusellm.demo.real import GEMMA_CHAT_TEMPLATE

    def templated(model: dict) -> dict:
        if not real:
            return {**model, "chat_template": DEMO_CHAT_TEMPLATE}
        if model.get("name") == "gemma3" or model["uri"].endswith("gemma-3-270m"):
            return {**model, "chat_template": GEMMA_CHAT_TEMPLATE}
        return model

    name = f"{raw['name']}-chat"
    return {
        **raw,
        "name": name,
        "target": templated(raw["target"]),
        "sources": [templated(m) for m in raw["sources"]],
        "corpus": {"uri": str(corpus), "format": "chat"},
        "fusion": {**raw["fusion"], "mode": "pairwise"},
        "merge": {"method": "task_arithmetic"},
        "tracking": {**raw["tracking"], "experiment": name, "registered_model": f"{name}-fused"},
    }


def flow_suite_results(run_id: str, suite: str = "local") -> dict[str, dict]:
    """{model label: per-task metrics} from the evaluation artifacts the flow logged to MLflow."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.get_run(run_id)
    children = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run_id}' and tags.mlflow.runName = 'evaluate'",
    )
    if not children:
        raise RuntimeError(f"MLflow run {run_id} has no 'evaluate' stage run")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(
            mlflow.artifacts.download_artifacts(
                run_id=children[0].info.run_id, artifact_path="evaluation", dst_path=tmp
            )
        )
        out = {}
        for result in sorted(root.glob(f"*/{suite}/results.json")):
            out[result.parent.parent.name] = json.loads(result.read_text())["metrics"]
    if not out:
        raise RuntimeError(f"MLflow run {run_id}: no evaluation/*/{suite}/results.json artifacts")
    return out


DEMO_SIZES = ("full", "tiny", "real")


def demo_recipes(size: str = "full"):
    """(DemoRecipe, DemoSourcesRecipe) of the demo: `full` is `make demo`'s; `tiny` keeps the
    demo's shape (three architectures and tokenizers, the mixed corpus, the baseline, the
    `local` suite) with models of a few thousand parameters and two training steps, built in
    seconds: for smoke tests of the plumbing, not for the method's gains; `real` fuses three
    real pretrained LLMs (`fusellm.demo.real`) and has no sources recipe."""
    from fusellm.demo.data import DemoSplits
    from fusellm.demo.sources import DEFAULT_RECIPE, DemoSourcesRecipe, SourceRecipe

    if size == "full":
        return DEFAULT_DEMO_RECIPE, DEFAULT_RECIPE
    if size == "real":  # real pretrained sources: fetched, not built (fusellm.demo.real)
        from fusellm.demo.real import REAL_RECIPE

        return REAL_RECIPE, None
    if size != "tiny":
        raise ValueError(f"demo size {size!r}: expected one of {', '.join(DEMO_SIZES)}")
    small = {
        "hidden": 16,
        "layers": 1,
        "heads": 2,
        "context": 128,
        "steps": 2,
        "batch_size": 2,
        "warmup_steps": 0,
        "tokenizer_bytes": 20_000,
    }
    sources = DemoSourcesRecipe(
        sources=tuple(
            SourceRecipe(
                name=s.name,
                architecture=s.architecture,
                tokenizer=s.tokenizer,
                vocab_size=400,
                mix=s.mix,
                **small,
            )
            for s in DEFAULT_RECIPE.sources
        ),
        data=DemoSplits(),
        train_bytes=30_000,
    )
    recipe = DemoRecipe(fusion_bytes=4_000, block_size=128, margin=4, steps=2, batch=2, lam=0.9)
    return recipe, sources


def prepare_demo(
    out: str | Path,
    *,
    recipe: DemoRecipe = DEFAULT_DEMO_RECIPE,
    sources_recipe=None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    console=None,
    real: bool = False,
    chat: bool = False,
) -> tuple[Path, FusionConfig]:
    """Steps 1-3 of the demo: sources (built or cached; `real`: the three real pretrained
    models, fetched into the cache), corpus and evaluation data, and ``<out>/config.yaml``;
    returns the config file and the parsed config. `chat`: FuseChat on the demo conversations
    (`fusellm.demo.chat`), pairwise, then merged."""
    from fusellm.config import parse_fusion_config
    from fusellm.demo import real as real_demo
    from fusellm.demo.sources import DEFAULT_RECIPE, build_sources

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    say = console.print if console is not None else (lambda *a, **k: None)
    rule = console.rule if console is not None else (lambda *a, **k: None)

    rule("[bold]1/5 sources")
    if real:
        paths = real_demo.real_sources(progress=progress)
    else:
        sources_recipe = (sources_recipe or DEFAULT_RECIPE).model_copy(update={"seed": recipe.seed})
        paths = build_sources(sources_recipe, cache_dir=cache_dir, progress=progress).paths
    rule("[bold]2/5 data")
    data = out / "data"
    if chat:
        n_docs = write_chat_corpus(data / "chat", recipe)
    else:
        n_docs = write_corpus(data / "corpus.jsonl", recipe)
    counts = write_eval_data(data / "eval", real_demo.REAL_HELDOUT_BYTES if real else None)
    kind = "conversations" if chat else "documents"
    say(f"fusion corpus: {n_docs} {kind}; held-out: {counts}")
    rule("[bold]3/5 config")
    raw = demo_config(
        recipe,
        paths,
        corpus=data / "corpus.jsonl",
        eval_dir=data / "eval",
        workdir=out / "work",
    )
    if real:
        raw = real_demo.real_config(raw)
    if chat:
        raw = chat_config(raw, data / "chat", real)
    config_path = write_text_atomic(out / "config.yaml", yaml.safe_dump(raw, sort_keys=False))
    say(f"wrote {config_path}")
    return config_path, parse_fusion_config(raw, source=str(config_path))


def run_demo(
    fuse: Callable[[FusionConfig], dict],
    out: str | Path = "fusellm-demo",
    *,
    recipe: DemoRecipe = DEFAULT_DEMO_RECIPE,
    sources_recipe=None,
    cache_dir: str | Path | None = None,
    home: str | Path | None = None,
    progress: bool = True,
    real: bool = False,
    chat: bool = False,
) -> dict:
    """Build, fuse, evaluate and report; returns the report mapping (see `fusellm.demo.report`).

    `real`: fuse the three real pretrained models (`fusellm.demo.real`, `make demo-real`).
    `chat`: fuse them as chat models on conversations, pairwise, then merge (FuseChat).

    `fuse` runs the fusion and returns its summary: the Prefect `fuse` flow (flows/fuse.py),
    handed in by the command line so that the library never imports the orchestration.
    """
    from rich.console import Console

    from fusellm.demo import report as reporting
    from fusellm.settings import apply_embedded_defaults

    console = Console()
    out = Path(out).resolve()
    apply_embedded_defaults(home)  # before Prefect and MLflow read their settings
    _, config = prepare_demo(
        out,
        recipe=recipe,
        sources_recipe=sources_recipe,
        cache_dir=cache_dir,
        progress=progress,
        console=console,
        real=real,
        chat=chat,
    )
    console.rule("[bold]4/5 the fuse flow (Prefect + MLflow)")
    summary = fuse(config)
    console.rule("[bold]5/5 report")
    results = flow_suite_results(summary["run_id"])
    metrics = {label: reporting.model_metrics(tasks) for label, tasks in results.items()}
    report = reporting.build_report(
        "fused", "baseline", config.source_names, metrics, recipe=None if chat else recipe
    )
    paths = reporting.write_report(report, out)
    _print_end(console, report, paths, home)
    return report


def _print_end(console, report: dict, paths: dict, home) -> None:
    from rich.table import Table

    from fusellm.demo.report import PRIMARY, verdict
    from fusellm.settings import ui_commands

    table = Table(title="held-out bits per byte (lower is better)")
    columns = [c for c in next(iter(report["metrics"].values())) if c.startswith(PRIMARY)]
    table.add_column("model")
    for c in columns:
        table.add_column(c.replace(PRIMARY, "bpb"), justify="right")
    for name, row in report["metrics"].items():
        table.add_row(name, *(f"{row[c]:.4f}" for c in columns))
    console.print(table)
    win = verdict(report)
    console.print(
        "fused beats every source and the CLM baseline: "
        + ("[bold green]yes[/]" if win["fused_wins"] else "[bold red]no[/]")
    )
    console.print(f"report: {paths['md']}  ({paths['json'].name}, {paths['png'].name})")
    for name, command in ui_commands(home).items():
        console.print(f"{name} UI: [cyan]{command}[/]", soft_wrap=True)
