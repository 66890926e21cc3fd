"""The fusion stages as plain functions over content-addressed folders (no orchestration here).

Every stage writes to ``<workdir>/<stage>/<key>``, where the key hashes the code version, the
content identities of the stage's inputs and its parameters; if the folder exists the stage
returns at once, so a re-run recomputes only what changed, and the same keys serve as the
orchestrator's cache keys (`fusellm.stages.base` says how folders are built atomically).
This module gathers the stages of `fusellm.stages` in one namespace, in pipeline order.
"""

from fusellm.stages.base import (
    STAGE_FILE,
    Artifact,
    ModelFiles,
    StageError,
    build_stage,
    code_hash,
    device_for,
    is_done,
    stage_key,
    stage_path,
    tokenizer_of,
)
from fusellm.stages.evaluation import (
    compare_key,
    compare_models,
    evaluate_key,
    evaluate_model,
    primary_scores,
)
from fusellm.stages.extraction import extract_key, extract_shard, merge_stores
from fusellm.stages.fusion import fuse_data, vocab_map
from fusellm.stages.prepare import (
    PIECES_FILE,
    fetch_model,
    make_pieces,
    pieces_key,
    read_pieces,
    resolve_identities,
    shard_count,
)
from fusellm.stages.registry import (
    changed_inputs,
    config_hash,
    read_record,
    register_fused,
    write_record,
)
from fusellm.stages.training import train_key, train_model, training_config

__all__ = [
    "PIECES_FILE", "STAGE_FILE", "Artifact", "ModelFiles", "StageError", "build_stage",
    "changed_inputs", "code_hash", "compare_key", "compare_models", "config_hash", "device_for",
    "evaluate_key", "evaluate_model", "extract_key", "extract_shard", "fetch_model", "fuse_data",
    "is_done", "make_pieces", "merge_stores", "pieces_key", "primary_scores", "read_pieces",
    "read_record", "register_fused", "resolve_identities", "shard_count", "stage_key",
    "stage_path", "tokenizer_of", "train_key", "train_model", "training_config", "vocab_map",
    "write_record",
]  # fmt: skip
