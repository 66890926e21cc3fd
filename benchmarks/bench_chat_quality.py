"""FuseChat's quality protocol: joint vs pairwise + SCE vs pairwise + task arithmetic, each
paired with the SFT baseline of its seed, on held-out conversations, at the demo's scale or
(``--real``) on three real checkpoints.

The demo's three sources (`fusellm.demo.sources`, built once and cached) as chat models (the
demo's template, `fusellm.demo.run.DEMO_CHAT_TEMPLATE`), the target the Llama-style one; the
corpus the demo conversations' fusion split (`fusellm.demo.chat`), each at most the window in
characters. Per seed, in one work folder (stages are reused: extraction once for all, the
baseline once per seed):

- ``joint``: FuseLLM's one training against every source (λ 0.9);
- ``pairwise-sce`` / ``pairwise-ta``: one training per source besides the target, merged with
  mergekit's SCE or task arithmetic (the pairwise trainings are the same for both);
  ``pairwise-sce-all``: SCE keeping every element (`merge.select_topk: 1`), which shows what
  its selection of the 10 % most varying elements costs;
- ``baseline``: plain SFT on the same conversations (λ 1).

Each model is scored on the validation and the test conversations by the bits per byte of the
replies given the conversation before them (`fusellm.demo.chat.reply_bits_per_byte`). A variant
is chosen on validation; test is for reporting. A difference from the baseline is a win only
when its mean over seeds lies more than twice its paired sd below zero.

With ``--real`` the models are those of `fusellm demo --real --chat` (`fusellm.demo.real`):
SmolLM2-135M-Instruct as pivot, Qwen2.5-Coder-0.5B-Instruct and Gemma-3-270M (Gemma's turn
format) as sources, with the real recipe (λ 0.9, top-10, learning rate 1e-4, batches of 4)
and conversations of at most 512 characters; each model is scored in its own template.

    .venv/bin/python benchmarks/bench_chat_quality.py --work /var/tmp/chat-quality
    .venv/bin/python benchmarks/bench_chat_quality.py --work ... --seeds 0 1 2 --steps 200
    .venv/bin/python benchmarks/bench_chat_quality.py --real --work /var/tmp/chat-quality-real

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import emit

from fusellm.config import parse_fusion_config
from fusellm.demo import real
from fusellm.demo.chat import conversations, reply_bits_per_byte
from fusellm.demo.quality import spread
from fusellm.demo.recipe import DEFAULT_DEMO_RECIPE
from fusellm.demo.run import chat_config, demo_config, write_chat_corpus
from fusellm.stages import pipeline
from fusellm.stages.pipeline import Executor

VARIANTS = {
    "joint": {"fusion": {"mode": "joint"}},
    "pairwise-sce": {"fusion": {"mode": "pairwise"}, "merge": {"method": "sce"}},
    "pairwise-ta": {"fusion": {"mode": "pairwise"}, "merge": {"method": "task_arithmetic"}},
    # SCE keeping every element: what its selection (10 % by default) costs
    "pairwise-sce-all": {
        "fusion": {"mode": "pairwise"},
        "merge": {"method": "sce", "select_topk": 1.0},
    },
}
PARTS = ("validation", "test")


def sources_of(real_models: bool) -> dict[str, Path]:
    """The three sources' folders: the real checkpoints or the demo's tiny models."""
    if real_models:
        return real.real_sources(progress=False)
    from fusellm.demo.sources import build_sources

    return build_sources(progress=False).paths


def variant_config(raw: dict, name: str, seed: int):
    data = {**raw, "training": {**raw["training"], "seed": seed}}
    for section, values in VARIANTS[name].items():
        data[section] = {**data.get(section, {}), **values}
    data["tracking"] = {**data["tracking"], "register_model": False}
    return parse_fusion_config(data)


def score(folder: Path, heldout: dict, template: str | None) -> dict:
    """Reply bits per byte on each held-out part, in `template` or the model's own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if template is not None:
        tokenizer.chat_template = template
    return {p: reply_bits_per_byte(model, tokenizer, heldout[p])["bits_per_byte"] for p in PARTS}


def summary(scores: dict, seeds: list[int], part: str) -> dict:
    out = {}
    for name in [*VARIANTS, "baseline"]:
        values = [scores[seed][name][part] for seed in seeds]
        row = {"bpb": spread(values)}
        if name != "baseline":
            diff = spread([scores[s][name][part] - scores[s]["baseline"][part] for s in seeds])
            diff["win"] = diff["mean"] < 0 and -diff["mean"] > 2 * diff["sd"]
            row["difference"] = diff
        out[name] = row
    return out


def print_table(table: dict, sources: dict, part: str) -> None:
    print(f"\n{part}: held-out reply bits per byte (mean ± sd over seeds; difference = minus SFT)")
    for name, bpb in sources.items():
        print(f"  {name:>16}  {bpb[part]:.4f} (source)")
    for name, row in table.items():
        line = f"  {name:>16}  {row['bpb']['mean']:.4f} ± {row['bpb']['sd']:.4f}"
        if "difference" in row:
            d = row["difference"]
            line += f"   {d['mean']:+.4f} ± {d['sd']:.4f}{'  win' if d['win'] else ''}"
        print(line)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="stages are reused here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per training (default: 200; --real: 16)",
    )
    parser.add_argument(
        "--heldout",
        type=int,
        default=None,
        help="conversations per part (default: 150; --real: 60)",
    )
    parser.add_argument(
        "--real", action="store_true", help="three real pretrained models (fusellm.demo.real)"
    )
    args = parser.parse_args(argv)
    steps = args.steps or (16 if args.real else 200)
    n_heldout = args.heldout or (60 if args.real else 150)

    started = time.perf_counter()
    base = real.REAL_RECIPE if args.real else DEFAULT_DEMO_RECIPE
    recipe = base.model_copy(update={"steps": steps})
    paths = sources_of(args.real)
    work = args.work.resolve()
    n = write_chat_corpus(work / "chat", recipe)
    (work / "eval").mkdir(parents=True, exist_ok=True)
    raw = demo_config(recipe, paths, corpus=work / "chat", eval_dir=work / "eval",
                      workdir=work / "work")  # fmt: skip
    if args.real:
        raw = real.real_config(raw)
    raw = chat_config(raw, work / "chat", real=args.real)
    templates = {m["name"]: m.get("chat_template") for m in raw["sources"]}
    pivot = templates[recipe.target]  # the trained models read the pivot's template
    heldout = {p: conversations(p, max_chars=recipe.block_size, limit=n_heldout) for p in PARTS}
    print(f"{n} fusion conversations; held-out: "
          + ", ".join(f"{p} {len(c)}" for p, c in heldout.items()))  # fmt: skip
    sources = {name: score(path, heldout, templates[name]) for name, path in paths.items()}
    scores: dict[int, dict] = {}
    for seed in args.seeds:
        scores[seed] = {}
        for name in VARIANTS:
            t0 = time.perf_counter()
            f = pipeline.walk(variant_config(raw, name, seed), Executor(), until="train")
            scores[seed][name] = score(f.trained["fused"].path / "model", heldout, pivot)
            if "baseline" not in scores[seed]:
                scores[seed]["baseline"] = score(
                    f.trained["baseline"].path / "model", heldout, pivot
                )
            print(f"seed {seed} {name}: {scores[seed][name]} ({time.perf_counter() - t0:.0f} s)")
    tables = {p: summary(scores, args.seeds, p) for p in PARTS}
    for p in PARTS:
        print_table(tables[p], sources, p)
    chosen = min(VARIANTS, key=lambda v: tables["validation"][v]["bpb"]["mean"])
    print(f"\nchosen on validation: {chosen}; on test: {tables['test'][chosen]}")
    result = {"chosen": chosen, "tables": tables, "sources": sources, "seeds": args.seeds,
              "steps": steps, "real": args.real, "conversations": n,
              "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    emit(result)
    return result


if __name__ == "__main__":
    main()
