"""Fused training data: the target's pieces with one fused top-k distribution per position.

Inputs are the pieces (text), the target's own top-k store, and per source its store, tokenizer
and vocabulary map. For every piece: align each source to the target (character offsets), move
its top-k into the target's positions and vocabulary, then fuse the candidates (the target's own
distribution first, then the sources) with MinCE or AvgCE, per sequence or per token. A source
that is the target itself (same model and tokenizer, as in the paper's recipe, where Llama-2 is
both) is the same candidate and counts once.

The output is itself a top-k store in the target vocabulary (`fusellm.data.store`), which the trainer
reads. Per source we record aligned coverage, exact-map rate, MinCE win rate and how many top-k
ids were dropped because they point past the source tokenizer (padding rows of the model output).

Sequence CE can be compared per token (the paper) or per byte (`ce_unit="byte"`, the default):
models with different tokenizers spread the same text over different numbers of tokens, so only
nats per byte are comparable across them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fusellm.data.store import StoreError, TopkRecord, TopkStore, TopkWriter
from fusellm.io.fingerprint import sha256_texts, tokenizer_fingerprint
from fusellm.method.align import pair_ends, token_end_chars
from fusellm.method.fuse import FUSIONS, fuse, transfer
from fusellm.method.vocab import VocabMap

GRANULARITIES = ("sequence", "token")
CE_UNITS = ("token", "byte")
ALIGNMENTS = ("offsets", "dtw")
NEXT_TOKENS = ("map", "target")


@dataclass
class SourceData:
    """What fusion needs from one source model."""

    name: str
    tokenizer: object
    store: TopkStore
    vocab_map: VocabMap


def _check_store(store: TopkStore, tokenizer, pieces: Sequence[str], who: str) -> None:
    """Fail before any work if a store does not belong to this tokenizer and these pieces."""
    meta = store.meta
    if meta.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
        raise StoreError(
            f"{store.dir}: the {who} store was made with another tokenizer "
            "(tokenizer fingerprint differs); re-run extraction for it"
        )
    if len(store) != len(pieces):
        raise StoreError(f"{store.dir}: the {who} store has {len(store)} records for {len(pieces)} pieces")
    if "texts_sha256" in meta and meta["texts_sha256"] != sha256_texts(pieces):
        raise StoreError(f"{store.dir}: the {who} store was made from other pieces (texts differ)")


def _check_map(source: SourceData, target_tokenizer, target_rows: int) -> None:
    """The map must cover exactly the source tokenizer and land inside the target's output."""
    if len(source.vocab_map) != len(source.tokenizer):
        raise ValueError(
            f"source '{source.name}': its vocabulary map has {len(source.vocab_map)} entries, "
            f"its tokenizer {len(source.tokenizer)}; rebuild the map for this tokenizer"
        )
    top = int(source.vocab_map.source_to_target.max(initial=-1))
    if top >= target_rows:
        raise ValueError(
            f"source '{source.name}': its vocabulary map reaches target id {top}, but the target "
            f"store has {target_rows} rows (target tokenizer: {len(target_tokenizer)} entries)"
        )


def same_as_target(source: SourceData, target_store: TopkStore, target_tokenizer) -> bool:
    """Is this source the target model itself (same store, or same weights and tokenizer)?"""
    if Path(source.store.dir).resolve() == Path(target_store.dir).resolve():
        return True
    fingerprint = source.store.meta.get("model_fingerprint")
    return (
        fingerprint is not None
        and fingerprint == target_store.meta.get("model_fingerprint")
        and tokenizer_fingerprint(source.tokenizer) == tokenizer_fingerprint(target_tokenizer)
    )


def _sequence_ce(record: TopkRecord, n_bytes: int, unit: str) -> float:
    if unit == "token":
        return record.ce
    scored = len(record) - 1 if record.trained is None else int(record.trained.sum())
    return record.ce * scored / max(n_bytes, 1)


def _token_ce(record: TopkRecord, rows: np.ndarray, who: str) -> np.ndarray:
    if record.token_ce is None:
        raise StoreError(f"per-token fusion needs per-token CE, but the {who} store has none")
    out = np.full(len(rows), np.nan)
    ok = rows >= 0
    out[ok] = record.token_ce[rows[ok]]
    return out


def prefix_of(store: TopkStore) -> int:
    """Positions before the text in this store's records (the document-start token), 0 or 1."""
    return int(store.meta.get("prefix_tokens", 0))


def framed_ends(text: str, tokenizer, record: TopkRecord, prefix: int, role: str) -> np.ndarray:
    """Where each position's context ends, over a record's positions before its end token.

    The document-start position's context is the empty text: it ends at character 0, so it
    pairs with another model's start position and with nothing else.
    """
    ids = record.input_ids[prefix:-1]
    _, ends = token_end_chars(text, tokenizer, role=role, ids=ids)
    return np.concatenate([np.zeros(prefix, dtype=np.int64), ends])


def _chat_view(piece: str, tokenizer, record: TopkRecord, role: str):
    """A model's reading of a chat piece, checked against the ids its store holds."""
    from fusellm.data.chat import read_piece, render

    view = render(read_piece(piece), tokenizer)
    if not np.array_equal(view.ids, record.input_ids):
        raise StoreError(
            f"the {role} store's ids differ from the conversation in its chat template "
            f"({len(record.input_ids)} against {len(view.ids)} tokens): the template changed "
            "since extraction; extract again"
        )
    return view


def _with_eos(text_alignment: np.ndarray) -> np.ndarray:
    """Add the end-token position: it predicts nothing, so it stays unaligned (the loss skips it)."""
    return np.append(text_alignment, -1)


def _align(text, target_tokenizer, t_ends, t_prefix, source, record, s_prefix, alignment):
    """Source position per target position before the end token: offsets (ours) or DTW."""
    role = f"source '{source.name}'"
    if alignment == "dtw":
        from fusellm.method.align import align_positions

        text_pairs = align_positions(
            text, target_tokenizer, source.tokenizer, method="dtw",
            source_ids=record.input_ids[s_prefix:-1],
        )
        text_pairs = np.where(text_pairs >= 0, text_pairs + s_prefix, -1)
        starts = np.full(t_prefix, 0 if s_prefix else -1, dtype=np.int64)
        return np.concatenate([starts, text_pairs])
    return pair_ends(t_ends, framed_ends(text, source.tokenizer, record, s_prefix, role))


def fuse_piece(
    text, target_tokenizer, target_record, sources, source_records, *, method, granularity, ce_unit, k,
    alignment="offsets", duplicates=(), prefixes=None, next_token="map", chat=False,
):
    """Fused (ids, logprobs) for one piece plus per-source stats; see module docstring.

    `duplicates`: indices of sources that are the target itself; they are not candidates again.
    `prefixes`: positions before the text in the target's and each source's records (document
    start tokens; default none). `next_token`: where a source's mass on the token it really
    reads next goes: "map" (through the vocabulary map) or "target" (to the token the target
    really reads next; `fusellm.method.fuse.transfer`). `chat`: the piece is a conversation,
    which each model reads in its own chat template (`fusellm.data.chat`).
    """
    t_prefix, *s_prefixes = prefixes or [0] * (1 + len(sources))
    if chat:
        view = _chat_view(text, target_tokenizer, target_record, "target")
        t_ends, n_bytes = view.ends, view.assistant_bytes
    else:
        t_ends = framed_ends(text, target_tokenizer, target_record, t_prefix, "target")
        n_bytes = len(text.encode("utf-8"))
    target_next = np.append(target_record.input_ids[1:], -1)
    candidates = [(target_record.ids[:, :k], target_record.logprobs[:, :k])]
    seq_ce = [_sequence_ce(target_record, n_bytes, ce_unit)]
    tok_ce = []
    if granularity == "token":
        if target_record.token_ce is None:
            raise StoreError("per-token fusion needs per-token CE, but the target store has none")
        # The target is always a candidate; after EOS nothing is predicted (CE is NaN there).
        tok_ce.append(np.nan_to_num(target_record.token_ce, nan=0.0))
    positions = len(target_next) - 1  # the last position (after EOS) predicts nothing
    if chat:  # sources speak for assistant text only
        positions = int(view.from_sources.sum())
    stats, column = [], []  # column: candidate index of each source (None: it is the target)
    for n, (source, record) in enumerate(zip(sources, source_records)):
        if n in duplicates:
            stats.append({"positions": positions, "aligned": positions, "exact_top1": positions,
                          "dropped_ids": 0, "wins": 0})
            column.append(None)
            continue
        if chat:
            s_view = _chat_view(text, source.tokenizer, record, f"source '{source.name}'")
            pairs = np.where(view.from_sources, pair_ends(t_ends, s_view.ends), -1)
        else:
            pairs = _with_eos(
                _align(text, target_tokenizer, t_ends, t_prefix, source, record, s_prefixes[n], alignment)
            )
        vmap = source.vocab_map
        source_next = np.append(record.input_ids[1:], -1) if next_token == "target" else None
        ids, lps, dropped = transfer(
            record.ids, record.logprobs, pairs, vmap.source_to_target, target_next, k, source_next
        )
        column.append(len(candidates))
        candidates.append((ids, lps))
        seq_ce.append(_sequence_ce(record, n_bytes, ce_unit))
        if granularity == "token":
            tok_ce.append(_token_ce(record, pairs, f"source '{source.name}'"))
        aligned = pairs[:-1] >= 0
        top1 = record.ids[pairs[:-1][aligned], 0]
        top1 = top1[(top1 >= 0) & (top1 < len(vmap))]  # empty slots and padding rows are not exact
        stats.append(
            {
                "positions": positions,
                "aligned": int(aligned.sum()),
                "exact_top1": int(vmap.exact[top1].sum()),
                "dropped_ids": dropped,
                "wins": 0,
            }
        )
    ce = np.array(seq_ce) if granularity == "sequence" else np.stack(tok_ce)
    ids, lps, decision = fuse(candidates, ce, method=method, k=k)
    if method == "min_ce":
        for c, stat in zip(column, stats):
            if c is not None:
                stat["wins"] = int((decision == c).sum()) if granularity == "token" else int(decision[0] == c)
    return ids, lps, stats


def build_fused_store(
    pieces: Sequence[str],
    target_tokenizer,
    target_store: TopkStore,
    sources: Sequence[SourceData],
    out_dir,
    *,
    method: str = "min_ce",
    granularity: str = "sequence",
    ce_unit: str = "byte",
    alignment: str = "offsets",
    next_token: str = "map",
    top_k: int | None = None,
    shard_size: int = 256,
    progress: bool = True,
) -> dict:
    """Write the fused training store for `pieces`; returns its manifest with per-source stats."""
    for value, allowed, field in (
        (method, FUSIONS, "method"),
        (granularity, GRANULARITIES, "granularity"),
        (ce_unit, CE_UNITS, "ce_unit"),
        (alignment, ALIGNMENTS, "alignment"),
        (next_token, NEXT_TOKENS, "next_token"),
    ):
        if value not in allowed:
            raise ValueError(f"{field}={value!r}; expected one of {', '.join(allowed)}")
    pieces = list(pieces)
    _check_store(target_store, target_tokenizer, pieces, "target")
    for source in sources:
        _check_store(source.store, source.tokenizer, pieces, f"source '{source.name}'")
    target_rows = target_store.manifest["vocab_size"]
    for source in sources:
        _check_map(source, target_tokenizer, target_rows)
    duplicates = tuple(n for n, s in enumerate(sources) if same_as_target(s, target_store, target_tokenizer))
    chat = bool(target_store.meta.get("chat"))
    if chat and alignment != "offsets":
        raise ValueError(f"alignment={alignment!r}: conversations are aligned on offsets only")
    k = top_k or target_store.top_k
    prefixes = [prefix_of(target_store), *(prefix_of(s.store) for s in sources)]
    meta = {
        "tokenizer_fingerprint": tokenizer_fingerprint(target_tokenizer),
        "texts_sha256": sha256_texts(pieces),
        "sources": [s.name for s in sources],
        "source_stores": [s.store.meta.get("model_fingerprint") for s in sources],
        "target_store": target_store.meta.get("model_fingerprint"),
        "vocab_maps": [s.vocab_map.key for s in sources],
        "vocab_map_methods": [s.vocab_map.method for s in sources],
        "same_as_target": [s.name for n, s in enumerate(sources) if n in duplicates],
        "method": method,
        "granularity": granularity,
        "ce_unit": ce_unit,
        "alignment": alignment,
        "next_token": next_token,
        "prefix_tokens": prefixes[0],
        **({"chat": True} if chat else {}),
        "document": {k_: v for k_, v in target_store.meta.items() if k_.startswith("document_")},
    }
    writer = TopkWriter(
        Path(out_dir), top_k=k, vocab_size=target_rows, meta=meta, shard_size=shard_size
    )
    bar = tqdm(total=len(pieces), desc=f"fuse ({method}, {granularity})", unit="piece", disable=not progress)
    for shard_index, start in enumerate(range(0, len(pieces), shard_size)):
        stop = min(start + shard_size, len(pieces))
        if shard_index < writer.done_shards:  # resumed: this shard is already on disk
            bar.update(stop - start)
            continue
        records = []
        totals = {s.name: dict.fromkeys(_COUNTS, 0) for s in sources}
        for i in range(start, stop):
            target_record = target_store[i]
            ids, lps, stats = fuse_piece(
                pieces[i], target_tokenizer, target_record, sources, [s.store[i] for s in sources],
                method=method, granularity=granularity, ce_unit=ce_unit, k=k, alignment=alignment,
                duplicates=duplicates, prefixes=prefixes, next_token=next_token, chat=chat,
            )
            for source, stat in zip(sources, stats):
                for key, value in stat.items():
                    totals[source.name][key] += value
            records.append(
                TopkRecord(target_record.input_ids, ids, lps, target_record.ce, trained=target_record.trained)
            )
            bar.update(1)
        writer.write_shard(records, source_sha256=sha256_texts(pieces[start:stop]), stats=totals)
    bar.close()
    summary = summarise_sources(
        writer.manifest["shards"],
        [s.name for s in sources],
        [float(s.vocab_map.exact.mean()) for s in sources],
        granularity,
        len(pieces),
        [n in duplicates for n in range(len(sources))],
    )
    return writer.finish(sources_stats=summary)


_COUNTS = ("positions", "aligned", "exact_top1", "wins", "dropped_ids")


def summarise_sources(
    shards: list,
    names: Sequence[str],
    exact_rates: Sequence[float],
    granularity: str,
    n_pieces: int,
    same_as_target: Sequence[bool],
) -> dict:
    """Per source, from the counts each shard recorded: shares for the logs, and `dropped_ids`,
    the top-k ids past its tokenizer. Works on any run of shards (one store, or several joined).

    A source that is the target itself reports `same_as_target` = 1 and no wins of its own (its
    distribution is the target's, which wins for it).
    """
    out = {}
    for name, exact_rate, same in zip(names, exact_rates, same_as_target):
        t = {key: sum(shard["stats"][name].get(key, 0) for shard in shards) for key in _COUNTS}
        decisions = t["positions"] if granularity == "token" else n_pieces
        out[name] = {
            "aligned_coverage": t["aligned"] / max(t["positions"], 1),
            "exact_map_rate_top1": t["exact_top1"] / max(t["aligned"], 1),
            "exact_map_rate_vocab": float(exact_rate),
            "min_ce_win_rate": t["wins"] / max(decisions, 1),
            "dropped_ids": t["dropped_ids"],
            "same_as_target": int(same),
        }
    return out
