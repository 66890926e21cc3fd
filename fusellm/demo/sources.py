"""Build the demo's three source models locally: different architectures, tokenizers, domains.

FuseLLM fuses models that differ in architecture, tokenizer and what they know. The demo makes
three such models in a few minutes of CPU, with nothing downloaded:

==================  ============  ==============================================  ==========
source              architecture  tokenizer                                       mostly on
==================  ============  ==============================================  ==========
``llama-docs``      Llama         SentencePiece-style BPE, 4k ("▁", byte fallback)  docs
``neox-code``       GPT-NeoX      byte-level BPE, 3k                              code
``gpt2-docstrings`` GPT-2         byte-level BPE, 5k, merges from other text      docstrings
==================  ============  ==============================================  ==========

The GPT-2-style tokenizer is byte-level BPE like the NeoX one, as the real GPT-2 and GPT-NeoX/MPT
tokenizers are, yet with another size and merges learned from other text, so its tokens cut text
differently (that is what the real pair looks like to alignment). WordPiece would be a third
family, but it drops whitespace and maps unseen characters to [UNK]: a causal LM on it could not
reproduce code's indentation and its bits per byte would not count the same text.

Each source gets the same budget (170 steps of 8 x 512 tokens, 1.2-1.9M parameters) on a
different mix of the domains (90 % its own, 5 % each other one), so each is best on its own
domain and none is best everywhere: the situation in which fusing knowledge pays. (With 80/10/10
mixes and a 6k byte-level vocabulary for the code model, that model won all three domains: a
larger vocabulary covers more bytes per token for the same token budget. The sizes above keep the
specialists ahead at home.) On 2 cores the three build in about four minutes.

Training is a plain torch loop (AdamW, warmup + cosine, gradient clipping) with a fixed seed and
deterministic algorithms, so a rebuild gives bitwise identical weights on the same machine and
library versions.

Built sources are cached under ``<cache>/demo-sources/<name>-<key>``, where the key hashes the
recipe, the training text and the library versions; a folder appears (by rename) only when
complete, and is reused as is.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from fusellm.demo.data import DOMAINS, DemoSplits, check_domains, load_split
from fusellm.io.fingerprint import sha256_json, sha256_texts

# Bump when the build below changes in a way the recipe does not show (invalidates caches).
BUILD_VERSION = 1


class SourceRecipe(BaseModel):
    """How one source is built: its architecture, tokenizer, size, data mix and training."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    architecture: Literal["llama", "gpt_neox", "gpt2"]
    tokenizer: Literal["spm", "bytelevel", "wordpiece"]
    vocab_size: int = Field(ge=300, le=65_536)
    mix: dict[str, float] = Field(description="domain -> share of training rows")
    hidden: int = Field(128, ge=8)
    layers: int = Field(3, ge=1)
    heads: int = Field(4, ge=1)
    context: int = Field(512, ge=8, description="training window = the model's position limit")
    steps: int = Field(170, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    tokenizer_bytes: int = Field(1_500_000, ge=1_000, description="text the tokenizer learns from")

    @field_validator("mix")
    @classmethod
    def _known_domains(cls, mix: dict[str, float]) -> dict[str, float]:
        check_domains(mix)
        if any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError(f"mix weights must be >= 0 with a positive sum, got {mix}")
        return mix

    @property
    def own_domain(self) -> str:
        """The domain this source sees most: the one it should be best at."""
        return max(self.mix, key=self.mix.get)


class DemoSourcesRecipe(BaseModel):
    """The three sources, the data they are trained on and the seed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sources: tuple[SourceRecipe, ...]
    data: DemoSplits = DemoSplits()
    train_bytes: int = Field(3_000_000, ge=1_000, description="training text per domain, at most")
    seed: int = 0

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: tuple[SourceRecipe, ...]) -> tuple[SourceRecipe, ...]:
        names = [s.name for s in sources]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"sources need distinct names, got {names}")
        return sources


# Three sources alike on purpose: equal budgets, each 90 % its own domain, so that each one is
# the best at something and fusion has something to gain from every one.
DEFAULT_RECIPE = DemoSourcesRecipe(
    sources=(
        SourceRecipe(
            name="llama-docs",
            architecture="llama",
            tokenizer="spm",
            vocab_size=4000,
            mix={"docs": 0.9, "code": 0.05, "docstrings": 0.05},
        ),
        SourceRecipe(
            name="neox-code",
            architecture="gpt_neox",
            tokenizer="bytelevel",
            vocab_size=3000,
            mix={"docs": 0.05, "code": 0.9, "docstrings": 0.05},
        ),
        SourceRecipe(
            name="gpt2-docstrings",
            architecture="gpt2",
            tokenizer="bytelevel",
            vocab_size=5000,
            mix={"docs": 0.05, "code": 0.05, "docstrings": 0.9},
        ),
    )
)


class BuiltSources(BaseModel):
    """Where the sources are and what building them measured."""

    paths: dict[str, Path]
    summary: dict

    def own_domains(self) -> dict[str, str]:
        return {s["name"]: s["own_domain"] for s in self.summary["sources"]}


def default_cache_dir() -> Path:
    """``$FUSELLM_CACHE``, else ``$XDG_CACHE_HOME/fusellm``, else ``~/.cache/fusellm``."""
    if os.environ.get("FUSELLM_CACHE"):
        return Path(os.environ["FUSELLM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fusellm"


def build_sources(
    recipe: DemoSourcesRecipe = DEFAULT_RECIPE,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> BuiltSources:
    """Build (or reuse from the cache) every source of `recipe`; returns paths and a summary."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    root = root / "demo-sources"
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train = {
        d: load_split(d, "train", max_bytes=recipe.train_bytes, config=recipe.data)
        for d in DOMAINS
    }
    for domain, docs in train.items():
        if not docs:
            raise ValueError(f"the {domain!r} domain has no training documents under {recipe.data}")
    paths, summaries = {}, []
    for source in recipe.sources:
        key = _content_key(source, recipe, train)
        path = root / f"{source.name}-{key[:16]}"
        summary_file = path / "summary.json"
        if summary_file.is_file():
            summary = json.loads(summary_file.read_text()) | {"cache_hit": True}
            if progress:
                tqdm.write(f"{source.name}: cached at {path}")
        else:
            summary = _build_atomically(source, recipe.seed, train, path, progress)
        paths[source.name] = path
        summaries.append(summary | {"path": str(path)})
    total = round(time.perf_counter() - started, 2)
    return BuiltSources(paths=paths, summary={"sources": summaries, "seconds": total})


def _content_key(source: SourceRecipe, recipe: DemoSourcesRecipe, train) -> str:
    import tokenizers
    import transformers

    return sha256_json(
        {
            "build": BUILD_VERSION,
            "source": source.model_dump(),
            "seed": recipe.seed,
            "data": recipe.data.model_dump(),
            "train_bytes": recipe.train_bytes,
            "text": {d: sha256_texts(train[d]) for d in sorted(source.mix) if source.mix[d] > 0},
            "versions": [torch.__version__, transformers.__version__, tokenizers.__version__],
        }
    )


def _build_atomically(source, seed, train, path: Path, progress: bool) -> dict:
    """Build into a temporary folder next to `path`, then rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        summary = build_source(source, train, tmp, seed=seed, progress=progress)
        summary["key"] = path.name
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "summary.json").is_file():  # not a concurrent build that finished
                raise
        return summary | {"cache_hit": False}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_source(
    source: SourceRecipe,
    train: dict[str, list[str]],
    out: str | Path,
    *,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train a tokenizer and a model for `source` on `train` texts and save both to `out`."""
    from fusellm.testing.tiny import save_tiny, tiny_model, train_tokenizer

    started = time.perf_counter()
    domains = [d for d in sorted(source.mix) if source.mix[d] > 0]
    missing = [d for d in domains if not train.get(d)]
    if missing:
        raise ValueError(f"source {source.name!r}: no training text for domains {missing}")
    say = tqdm.write if progress else (lambda _: None)
    say(f"{source.name}: training a {source.tokenizer} tokenizer of {source.vocab_size} tokens")
    tokenizer = train_tokenizer(
        _tokenizer_texts(source, train), kind=source.tokenizer, vocab_size=source.vocab_size
    )
    streams = {d: token_stream(tokenizer, train[d]) for d in domains}
    say(f"{source.name}: " + ", ".join(f"{d} {len(s):,} tokens" for d, s in streams.items()))
    for domain, stream in streams.items():
        if len(stream) <= source.context:
            raise ValueError(
                f"source {source.name!r}: the {domain!r} training text is {len(stream)} tokens, "
                f"shorter than one context of {source.context}; lower `context` or add text"
            )
    model = tiny_model(
        source.architecture,
        tokenizer,
        seed=seed,
        hidden=source.hidden,
        layers=source.layers,
        heads=source.heads,
        max_positions=source.context,
    )
    _without_dropout(model)
    losses = train_clm(model, streams, source, seed=seed, progress=progress)
    model.eval()
    save_tiny(model, tokenizer, out)
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "name": source.name,
        "architecture": source.architecture,
        "tokenizer": source.tokenizer,
        "vocab_size": len(tokenizer),
        "own_domain": source.own_domain,
        "mix": source.mix,
        "params": sum(p.numel() for p in model.parameters()),
        "context": source.context,
        "steps": source.steps,
        "tokens": source.steps * source.batch_size * source.context,
        "train_loss": round(sum(tail) / len(tail), 4),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _tokenizer_texts(source: SourceRecipe, train: dict[str, list[str]]) -> list[str]:
    """Training documents in the source's mix, `tokenizer_bytes` in all."""
    total = sum(source.mix.values())
    texts = []
    for domain in sorted(source.mix):
        budget, used = source.tokenizer_bytes * source.mix[domain] / total, 0
        for doc in train.get(domain, []):
            if used >= budget:
                break
            texts.append(doc)
            used += len(doc.encode("utf-8"))
    return texts


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts as one id sequence, each [BOS] + tokens + [EOS], as held-out scoring sees them."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids += [bos, *encoded, tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def _without_dropout(model) -> None:
    """Switch dropout off (GPT-2's config has 0.1): a few hundred steps are all underfitting."""
    for key, value in model.config.to_dict().items():
        if ("pdrop" in key or "dropout" in key) and isinstance(value, float):
            setattr(model.config, key, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def sample_batch(
    streams: dict[str, torch.Tensor],
    mix: dict[str, float],
    batch_size: int,
    context: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Rows of `context` tokens: each from a domain drawn by `mix`, at a random offset."""
    domains = list(streams)
    weights = torch.tensor([mix[d] for d in domains], dtype=torch.double)
    picks = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
    rows = []
    for pick in picks.tolist():
        stream = streams[domains[pick]]
        start = int(torch.randint(len(stream) - context + 1, (1,), generator=generator))
        rows.append(stream[start : start + context])
    return torch.stack(rows)


def train_clm(
    model, streams: dict[str, torch.Tensor], source: SourceRecipe, *, seed: int, progress: bool
) -> list[float]:
    """Plain next-token training; returns the loss of every step."""
    from transformers import get_cosine_schedule_with_warmup

    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices; not norms and biases
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": source.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=source.lr,
        betas=(0.9, 0.95),
    )
    schedule = get_cosine_schedule_with_warmup(
        optimizer, min(source.warmup_steps, source.steps // 2), source.steps
    )
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    bar = tqdm(range(source.steps), desc=source.name, disable=not progress, unit="step")
    with _deterministic():
        for _ in bar:
            batch = sample_batch(streams, source.mix, source.batch_size, source.context, generator)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"source {source.name!r}: loss became {losses[-1]}")
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


@contextlib.contextmanager
def _deterministic():
    """Deterministic kernels while training, restoring the caller's setting afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def heldout_report(
    built: BuiltSources,
    *,
    recipe: DemoSourcesRecipe = DEFAULT_RECIPE,
    max_bytes: int | None = 60_000,
    progress: bool = True,
) -> dict:
    """Bits/byte of every source on every domain's held-out text, and who wins where."""
    from fusellm.demo.heldout import best_per_domain, bits_per_byte_table

    texts = {
        d: load_split(d, "heldout", max_bytes=max_bytes, config=recipe.data) for d in DOMAINS
    }
    table = bits_per_byte_table(built.paths, texts, progress=progress)
    best = best_per_domain(table)
    own = built.own_domains()
    return {
        "bits_per_byte": table,
        "best": best,
        "specialists_win": all(best.get(domain) == name for name, domain in own.items()),
    }


def main() -> None:
    """Build the default sources, then print their held-out bits/byte per domain."""
    from fusellm.demo.heldout import print_table

    built = build_sources()
    report = heldout_report(built)
    print_table(report["bits_per_byte"])
    verdict = "yes" if report["specialists_win"] else "NO"
    print(f"each source is best on its own domain: {verdict} (best: {report['best']})")
    print(json.dumps({"build": built.summary, **report}, default=str))


if __name__ == "__main__":
    main()
