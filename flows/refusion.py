"""Scheduled re-fusion: fuse again only when a source, the target or the corpus changed.

Identities are cheap to resolve (Hub commit shas, S3 ETag listings, local content hashes, the
corpus fingerprint) and are compared with the record the last successful `fuse` left in the work
folder. Nothing changed: nothing runs, no training. Something changed: `fuse` runs, and its
content-addressed stages recompute only what depends on the change.

Which fusion: the config itself (a form in the UI), or a YAML file read where the flow runs:
`config_path`, else `$FUSELLM_CONFIG` there, else `fusion.yaml` in the flow's working folder
(the project folder of a deployment), so a deployment needs nothing baked in.
"""

from __future__ import annotations

import os

from prefect import flow, get_run_logger

from fusellm.config import FusionConfig, load_fusion_config
from fusellm.settings import apply_tracking_defaults
from fusellm.stages.prepare import resolve_identities
from fusellm.stages.registry import changed_inputs
from fusellm_flows.fuse import fuse
from fusellm_tasks.stages import PrefectExecutor

CONFIG_ENV = "FUSELLM_CONFIG"
DEFAULT_CONFIG = "fusion.yaml"


def config_file(config_path: str | None) -> str:
    """`config_path`, else `$FUSELLM_CONFIG`, else `fusion.yaml` (relative to the working folder)."""
    return config_path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG


@flow(name="refusion")
def refusion(config: FusionConfig | None = None, config_path: str | None = None) -> dict:
    """Check the inputs of a fusion and re-fuse if any changed since the last successful run.

    Give the config itself (a form in the UI) or `config_path`, a YAML file readable where the
    flow runs (default: `$FUSELLM_CONFIG` there, else `fusion.yaml` in its working folder).
    """
    apply_tracking_defaults()
    if config is not None and config_path is not None:
        raise ValueError("refusion needs exactly one of config or config_path, not both")
    if config is None:
        config = load_fusion_config(config_file(config_path))
    identities = PrefectExecutor().call("resolve-sources", resolve_identities, config)
    changed = changed_inputs(config, identities)
    log = get_run_logger()
    if changed == []:
        log.info("no source, target or corpus changed since the last fusion: nothing to do")
        return {"changed": [], "fused": False}
    log.info("re-fusing; changed: %s", changed if changed is not None else "no previous run")
    summary = fuse(config)
    return {"changed": changed, "fused": True, "summary": summary}
