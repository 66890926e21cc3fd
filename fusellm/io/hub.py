"""Models from the Hugging Face Hub: commit identities and snapshot downloads.

Goes through `huggingface_hub` so its cache, `HF_HUB_OFFLINE` and resumption apply; pickled
checkpoints are never downloaded (`load_model` refuses them anyway).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from fusellm.io.uris import HubURI, SourceError

log = logging.getLogger(__name__)

PICKLES = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.h5", "*.msgpack", "*.ot"]
_SHA = re.compile(r"^[0-9a-f]{40}$")


# ---------------------------------------------------------------------------------------------
# Hugging Face Hub


def hub_offline() -> bool:
    """Offline mode as set now (huggingface_hub reads the variable only once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if env is not None:
        return env.strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE)


def _hub_cache(cache_dir: str | Path | None) -> Path:
    from huggingface_hub import constants

    return (
        Path(cache_dir)
        if cache_dir
        else Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)
    )


def _not_cached(uri: HubURI, cache: Path) -> SourceError:
    return SourceError(
        f"{uri.repo_type} {uri.repo_id} (revision {uri.revision}) is not in the Hugging Face cache "
        f"at {cache} and HF_HUB_OFFLINE is set: download it once with network access, or unset "
        "HF_HUB_OFFLINE"
    )


def hub_commit(uri: HubURI, *, cache_dir: str | Path | None = None) -> str:
    """Commit sha of the revision: asked from the Hub online, read from the cache offline."""
    cache = _hub_cache(cache_dir)
    if hub_offline():
        folder = cache / f"{uri.repo_type}s--{uri.repo_id.replace('/', '--')}"
        if _SHA.match(uri.revision):
            sha = uri.revision
        else:
            ref_file = folder / "refs" / uri.revision
            if not ref_file.is_file():
                raise _not_cached(uri, cache)
            sha = ref_file.read_text().strip()
        if not (folder / "snapshots" / sha).is_dir():
            raise _not_cached(uri, cache)
        return sha
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().repo_info(uri.repo_id, revision=uri.revision, repo_type=uri.repo_type)
    except RevisionNotFoundError:
        raise SourceError(f"{uri}: revision {uri.revision!r} not found on the Hub") from None
    except RepositoryNotFoundError:
        raise SourceError(f"{uri}: repository not found on the Hub (or it is private)") from None
    return info.sha


def fetch_hub(uri: HubURI, *, cache_dir: str | Path | None = None) -> Path:
    """Snapshot of the repo in the Hub cache, without pickled checkpoints."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = hub_offline()
    cache = _hub_cache(cache_dir)
    try:
        folder = snapshot_download(
            uri.repo_id,
            revision=uri.revision,
            repo_type=uri.repo_type,
            cache_dir=str(cache),
            ignore_patterns=PICKLES,
            local_files_only=offline,
        )
    except LocalEntryNotFoundError:
        if offline:
            raise _not_cached(uri, cache) from None
        raise SourceError(
            f"{uri}: the Hub cannot be reached and it is not in the cache {cache}"
        ) from None
    return Path(folder)

