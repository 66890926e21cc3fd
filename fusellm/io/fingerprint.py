"""Content fingerprints: what makes a cached artifact valid for a model or tokenizer.

Stores, vocabulary maps and alignments are keyed by these, so a cache is reused only for the
same content, never for the same *name* (a re-uploaded model with the same name must not hit).
"""

from __future__ import annotations

import hashlib
import json

# Config keys that describe where or how a model was loaded, not what it computes.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_attn_implementation",
    "_attn_implementation_internal",
    "_commit_hash",
    "use_cache",
}
_SAMPLES_PER_TENSOR = 4096


def sha256_json(obj) -> str:
    """sha256 of a JSON value with sorted keys (stable across runs and machines)."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything that decides how a tokenizer maps text to ids.

    Serialising a large vocabulary costs seconds (Gemma 3's 262,144 entries: ~3 s), and every
    extraction, fusion and training unit asks for it: the result is kept on the tokenizer
    object, recomputed when its size or special tokens change (adding tokens does both).
    """
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    state = (len(tokenizer), json.dumps(special, sort_keys=True))
    cached = getattr(tokenizer, "_fusellm_fingerprint", None)
    if cached is not None and cached[0] == state:
        return cached[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        content = json.loads(backend.to_str())
    else:
        content = {"vocab": tokenizer.get_vocab()}
    fingerprint = sha256_json({"tokenizer": content, "special": special})
    try:
        tokenizer._fusellm_fingerprint = (state, fingerprint)
    except AttributeError:  # a tokenizer that takes no attributes: computed every time
        pass
    return fingerprint


def model_fingerprint(model) -> str:
    """sha256 of a model's config and a strided sample of every parameter.

    Hashing every weight of a 7B model would cost a full pass over 14 GB; a fixed sample of each
    tensor (plus names, shapes and dtypes) still changes whenever training touched the weights.
    """
    import torch  # here, not at the top: align-and-fuse workers import this module, not torch

    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256(sha256_json(config).encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
            sample = flat[::step][:_SAMPLES_PER_TENSOR].to("cpu", torch.float32).contiguous()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def sha256_texts(texts) -> str:
    """Order-sensitive hash of a list of texts (identifies the pieces a shard was made from)."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()
