"""Scheduled re-fusion: fuse again only when a source, the target or the corpus changed.

Identities are cheap to resolve (Hub commit shas, S3 ETag listings, local content hashes, the
corpus fingerprint) and are compared with the record the last successful `fuse` left in the work
folder. Nothing changed: nothing runs, no training. Something changed: `fuse` runs, and its
content-addressed stages recompute only what depends on the change.
"""

from __future__ import annotations

from fusellm_flows.fuse import fuse
from fusellm_tasks.stages import PrefectExecutor
from prefect import flow, get_run_logger

from fusellm.config import FusionConfig, load_fusion_config
from fusellm.stages.prepare import resolve_identities
from fusellm.stages.registry import changed_inputs


@flow(name="refusion")
def refusion(config: FusionConfig | None = None, config_path: str | None = None) -> dict:
    """Check the inputs of a fusion and re-fuse if any changed since the last successful run.

    Give the config itself (a form in the UI) or `config_path`, a YAML file readable where the
    flow runs (what a scheduled deployment usually passes).
    """
    if (config is None) == (config_path is None):
        raise ValueError("refusion needs exactly one of config or config_path")
    if config is None:
        config = load_fusion_config(config_path)
    identities = PrefectExecutor().call("resolve-sources", resolve_identities, config)
    changed = changed_inputs(config, identities)
    log = get_run_logger()
    if changed == []:
        log.info("no source, target or corpus changed since the last fusion: nothing to do")
        return {"changed": [], "fused": False}
    log.info("re-fusing; changed: %s", changed if changed is not None else "no previous run")
    summary = fuse(config)
    return {"changed": changed, "fused": True, "summary": summary}
