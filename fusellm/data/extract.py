"""Extraction: run a model over text pieces and store its top-k next-token distributions (docs/design.md §2.2).

Only [batch, length, k] values and ids (plus the next-token CE) leave the device: the full
[batch, length, vocab] logits never cross to the host. Pieces are tokenized with
`add_special_tokens=False` and the model's EOS appended, so every model sees exactly the
characters of the piece and predicts its end.

A model's output often has more rows than its tokenizer has entries (padded to a round size:
MPT-7B 50,432 rows for ~50,277 tokens, Qwen2 151,936 for 151,646). The store keeps ids as the
model ranks them, up to its output size, and records the tokenizer's size; fusion drops ids past
the tokenizer (they stand for no text) and counts them.

Work is done shard by shard (`shard_size` pieces); each finished shard is on disk before the next
starts, so a killed extraction resumes at the first missing shard.

How much of the model's probability its top-k holds decides what truncation costs (a 7B model
keeps most of it in 10 tokens, the demo's 2M-parameter ones about a third). Extraction counts,
from the exact float values before they are companded, the positions whose top-k holds at least
50 %, 90 % and 99 % of the mass; each shard's counts go into its manifest entry and the store's
manifest reports the shares as ``topk_mass`` (`fusellm.data.store.topk_mass_summary`), summed
from the counts so that a store joined from shards says exactly what one extraction would.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fusellm.data.framing import DocumentFrame, document_frame
from fusellm.data.store import MASS_LEVELS, TopkRecord, TopkWriter, topk_mass_summary
from fusellm.io.fingerprint import model_fingerprint, sha256_texts, tokenizer_fingerprint

_POSITION_CHUNK = 1024  # positions per log-softmax chunk: bounds the float32 copy of the logits


def _output_vocab(model) -> int:
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def _input_rows(model) -> int | None:
    embed = model.get_input_embeddings()
    weight = getattr(embed, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def _encode(
    texts: Sequence[str], tokenizer, max_length: int, frame: DocumentFrame | None
) -> tuple[list[list[int]], list[np.ndarray | None]]:
    """Token ids of each piece inside its frame, or (`frame` None: chat pieces) rendered in
    the model's chat template, with the positions in the loss; errors name the piece."""
    from fusellm.data.chat import read_piece, render

    encoded, trained = [], []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise ValueError(f"piece {i} is empty (or not a string); remove empty pieces first")
        if frame is None:
            view = render(read_piece(text), tokenizer)
            ids = view.ids.tolist()
            trained.append(view.trained)
        else:
            ids = frame.wrap(tokenizer(text, add_special_tokens=False)["input_ids"])
            trained.append(None)
        if len(ids) > max_length:
            raise ValueError(
                f"piece {i} has {len(ids)} tokens with its document tokens, more than max_length={max_length}; "
                "split the corpus with fusellm.data.pieces.make_pieces"
            )
        encoded.append(ids)
    return encoded, trained


def _framing(frame: DocumentFrame | None, tokenizer) -> dict:
    """What a store says about how its model saw a piece: its frame, or its chat template."""
    if frame is None:
        return {"chat": True, "prefix_tokens": 0, "eos_token_id": tokenizer.eos_token_id,
                "chat_template_sha256": sha256_texts([tokenizer.chat_template])}  # fmt: skip
    return {
        "eos_token_id": frame.end,
        "prefix_tokens": frame.prefix,  # positions before the text: fusion aligns past them
        **frame.describe(),
    }


def _autocast(device: torch.device, model_dtype: torch.dtype):
    """bf16 autocast on GPUs that support it, for models loaded in float32."""
    if device.type == "cuda" and model_dtype == torch.float32 and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def _topk_batch(model, batch: list[list[int]], top_k: int, device, piece_ids: list[int]):
    """Forward one padded batch; return per-sequence (ids, logprobs, next-token NLL) on the host."""
    lengths = [len(ids) for ids in batch]
    width = max(lengths)
    input_ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    with _autocast(device, next(model.parameters()).dtype):
        logits = model(input_ids=input_ids, attention_mask=mask).logits
    next_ids = torch.roll(input_ids, -1, dims=1)
    values, indices, nll = [], [], []
    for start in range(0, width, _POSITION_CHUNK):
        part = logits[:, start : start + _POSITION_CHUNK].float()
        log_z = torch.logsumexp(part, dim=-1, keepdim=True)
        top_v, top_i = part.topk(top_k, dim=-1)
        values.append(top_v - log_z)
        indices.append(top_i)
        nll.append(
            (log_z - part.gather(-1, next_ids[:, start : start + _POSITION_CHUNK, None]))[..., 0]
        )
    values, indices, nll = torch.cat(values, 1), torch.cat(indices, 1), torch.cat(nll, 1)
    valid = mask.bool()
    bad = ~torch.isfinite(values[..., 0]) & valid
    if bad.any():
        row = int(bad.any(dim=1).nonzero()[0])
        raise FloatingPointError(
            f"the model produced NaN or infinite logits for piece {piece_ids[row]}; "
            "check the weights and the dtype (float16 overflow?)"
        )
    values, indices, nll = values.cpu().numpy(), indices.cpu().numpy(), nll.cpu().numpy()
    return [(indices[row, :n], values[row, :n], nll[row, :n]) for row, n in enumerate(lengths)]


def _record(ids: list[int], top_ids, top_lp, nll, with_token_ce: bool, trained=None) -> TopkRecord:
    token_nll = nll.astype(np.float32).copy()
    token_nll[-1] = np.nan  # the last position (after EOS) predicts nothing
    scored = token_nll[:-1] if trained is None else token_nll[trained]  # chat: the loss's own
    ce = float(scored.mean()) if scored.size else float("nan")
    return TopkRecord(
        input_ids=np.asarray(ids, dtype=np.int64),
        ids=top_ids.astype(np.int64),
        logprobs=top_lp.astype(np.float32),
        ce=ce,
        token_ce=token_nll if with_token_ce else None,
        trained=trained,
    )


def topk_mass_counts(records: Sequence[TopkRecord]) -> dict:
    """Per shard: positions that predict a token, their summed top-k mass, and how many hold
    at least each level of `MASS_LEVELS` (the position after EOS predicts nothing: not counted).
    """
    mass = np.concatenate(
        [np.exp(r.logprobs[:-1].astype(np.float64)).sum(-1) for r in records] or [np.zeros(0)]
    )
    counts = {name: int((mass >= level).sum()) for name, level in MASS_LEVELS.items()}
    return {"positions": int(mass.size), "mass_sum": float(mass.sum()), **counts}


def extract_topk(
    model,
    tokenizer,
    texts: Sequence[str],
    out_dir,
    *,
    top_k: int = 10,
    batch_size: int = 8,
    max_length: int = 2048,
    shard_size: int = 256,
    token_ce: bool = True,
    progress: bool = True,
    frame: DocumentFrame | None = None,
    chat: bool = False,
) -> dict:
    """Write the top-k store of `model` over `texts` to `out_dir`; returns its manifest.

    `frame`: the tokens around each piece (default: the tokenizer's own, `document_frame`).
    `chat`: the pieces are conversations, each rendered in the model's chat template (no
    frame); records say which positions are in the loss (`fusellm.data.chat`).
    Resumes an interrupted run in the same folder (same model, tokenizer, parameters and texts).
    """
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to extract from")
    vocab = _output_vocab(model)
    if not 1 <= top_k <= vocab:
        raise ValueError(f"top_k={top_k} must be between 1 and the model's vocabulary size {vocab}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    frame = None if chat else frame or document_frame(tokenizer)
    encoded, trained = _encode(texts, tokenizer, max_length, frame)
    rows = _input_rows(model)
    top = max(max(ids) for ids in encoded)
    if rows is not None and top >= rows:
        piece = next(i for i, ids in enumerate(encoded) if max(ids) == top)
        raise ValueError(
            f"piece {piece} has token id {top}, but the model has only {rows} embedding rows; "
            f"the tokenizer ({len(tokenizer)} entries) does not belong to this model"
        )
    meta = {
        "model_fingerprint": model_fingerprint(model),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        # the folder's name, not its path: a store is the same bytes wherever the work folder
        # is mounted (fingerprints above say which model it is)
        "model_name": Path(getattr(model.config, "_name_or_path", "") or "").name
        or type(model).__name__,
        "max_length": max_length,
        **_framing(frame, tokenizer),
        "tokenizer_size": len(tokenizer),
        "texts_sha256": sha256_texts(texts),
    }
    writer = TopkWriter(
        Path(out_dir), top_k=top_k, vocab_size=vocab, meta=meta, shard_size=shard_size
    )
    device = next(model.parameters()).device
    model.eval()
    started = time.perf_counter()
    shard_starts = range(0, len(texts), shard_size)
    done = writer.done_shards
    bar = tqdm(
        total=len(texts),
        initial=min(done * shard_size, len(texts)),
        desc=f"extract top-{top_k}",
        unit="piece",
        disable=not progress,
    )
    new_tokens = 0
    for shard_index, start in enumerate(shard_starts):
        if shard_index < done:
            continue
        chunk = encoded[start : start + shard_size]
        order = sorted(range(len(chunk)), key=lambda i: -len(chunk[i]))  # less padding
        results: list = [None] * len(chunk)
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            outs = _topk_batch(
                model, [chunk[i] for i in rows], top_k, device, [start + i for i in rows]
            )
            for i, out in zip(rows, outs):
                results[i] = _record(chunk[i], *out, token_ce, trained[start + i])
            bar.update(len(rows))
        writer.write_shard(
            results,
            source_sha256=sha256_texts(texts[start : start + shard_size]),
            stats={"topk_mass": topk_mass_counts(results)},
        )
        new_tokens += sum(len(ids) for ids in chunk)
    bar.close()
    seconds = time.perf_counter() - started
    manifest = writer.finish(topk_mass=topk_mass_summary(writer.manifest["shards"]))
    # Timings go to the caller, not into the store: a store is the same bytes wherever and
    # however fast it was built (parts on other workers, a resumed run).
    return {
        **manifest,
        "seconds": seconds,
        "tokens_per_second": new_tokens / seconds if seconds > 0 else None,
    }
