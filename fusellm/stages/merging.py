"""The merge stage: the pairwise fused models merged onto the pivot (docs/merging.md).

FuseChat's second step. Its inputs are the pivot (a model, by its content identity) and the
pairwise fused models (stage folders, by their keys); `merge/<key>/model` holds the merged
model, which is evaluated and registered as a fused model is. The merge itself is mergekit's
(`fusellm.method.merge`).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from fusellm.config import FusionConfig, MergeConfig
from fusellm.stages.base import Artifact, ModelFiles, Unit, stage_key

STAGE = "merge"
MODEL = "model"  # the merged model's folder inside the stage folder


def merge_parameters(merge: MergeConfig) -> dict:
    """The method's parameters as the config sets them (None: the method's default)."""
    from fusellm.method.merge import PARAMETERS

    return {name: getattr(merge, name) for name in PARAMETERS[merge.method]}


def model_folder(model: Artifact) -> Path:
    """Where a stage folder (a trained or merged model) keeps its model."""
    return model.path / MODEL


def merge_key(pivot: ModelFiles, models: Sequence[Artifact], merge: MergeConfig) -> str:
    """The pivot's identity, the models' keys in order, the method and its parameters with
    their defaults filled in (so a default spelled out is the same merge), and the dtype.

    Nothing else of the config counts: the merge reads only these folders.
    """
    from fusellm.method.merge import resolve_parameters

    parameters = resolve_parameters(merge.method, merge_parameters(merge), len(models))
    return stage_key(
        STAGE,
        pivot=pivot.identity,
        models=[m.key for m in models],
        method=merge.method,
        parameters=parameters,
        dtype=merge.dtype,
    )


def merge_unit(pivot: ModelFiles, models: Sequence[Artifact], config: FusionConfig) -> Unit:
    """Merge the pairwise fused `models` (their stage folders, in order) onto `pivot`."""
    merge = config.merge
    models = list(models)
    key = merge_key(pivot, models, merge)

    def build(folder: Path) -> dict:
        from fusellm.method.merge import merge_models

        for leftover in folder.iterdir():  # a merge does not resume: start from nothing
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        record = merge_models(
            pivot.path,
            [model_folder(m) for m in models],
            folder / MODEL,
            method=merge.method,
            parameters=merge_parameters(merge),
            dtype=merge.dtype,
            trust_remote_code=pivot.ref.trust_remote_code,
        )
        return {
            "method": record["method"],
            "parameters": record["parameters"],
            "dtype": record["dtype"],
            "pivot": pivot.name,
            "models": [m.key for m in models],
            "mergekit": record["mergekit"],
        }

    return Unit(STAGE, key, STAGE, config.workdir, build, inputs=tuple(m.key for m in models))
