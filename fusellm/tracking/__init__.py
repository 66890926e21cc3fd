"""MLflow tracking of a fusion: one parent run, a nested run per stage, the fused model registered.

Layout in MLflow (experiment `fusellm` by default):

- parent run (`fusion_run`): the whole config as flattened parameters (`training.lam = 0.9`)
  and as `config.json`; tags `fusellm.code_version`, `fusellm.corpus_sha256`,
  `fusellm.source.<name>.revision` and whatever the caller adds;
- nested runs (`stage_run`), tagged `fusellm.stage`: metrics, tables, charts, logs of a stage;
- the fused model, registered as a new version (`log_and_register_model`); the alias
  `champion` moves to it only when it beats the current champion and every source, else the
  alias `challenger` does;
- on the parent run: the corpus and the evaluation data as dataset inputs (`log_fusion_inputs`),
  a description with the champion decision, links and the comparison table
  (`fusion_markdown`, `set_description`); stage runs of extraction and training record
  MLflow's system metrics.

Secrets never reach the tracking store (`fusellm.tracking.redact`): parameter or tag keys with a
word such as key, secret, token, password or credential are dropped, and URL credentials are
masked. Runs are found through MLflow's active run of the calling thread, else the fusion run
open in the process (`fusellm.tracking.current`).

Modules: `redact` (what may be logged), `current` (which run a call writes to), `runs`
(experiment, fusion and stage runs), `log` (metrics, artifacts, JSON, figures, tags),
`champion` (the promotion rule), `registry` (log and register the model), `load` (load it back),
`inputs` (datasets), `report` (the description and links into the MLflow UI).
"""

from fusellm.tracking.champion import beats, champion_decision
from fusellm.tracking.current import TrackingError, current_run_id
from fusellm.tracking.inputs import log_fusion_inputs
from fusellm.tracking.load import load_registered
from fusellm.tracking.log import log_artifact, log_figure, log_json, log_metrics, set_tags
from fusellm.tracking.redact import flatten_params, is_secret_key, redact
from fusellm.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    TAG_FUSED,
    TAG_LOWER_IS_BETTER,
    TAG_METRIC,
    TAG_METRIC_VALUE,
    TAG_ROLE,
    TAG_SOURCE_SCORE,
    TAG_SOURCES,
    RegistrationResult,
    log_and_register_model,
)
from fusellm.tracking.report import (
    decision_line,
    fusion_markdown,
    model_version_url,
    run_url,
    set_description,
)
from fusellm.tracking.runs import (
    TAG_CODE_VERSION,
    TAG_STAGE,
    code_version,
    ensure_experiment,
    fusion_run,
    readable_run_name,
    stage_run,
)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "TAG_CODE_VERSION",
    "TAG_FUSED",
    "TAG_LOWER_IS_BETTER",
    "TAG_METRIC",
    "TAG_METRIC_VALUE",
    "TAG_ROLE",
    "TAG_SOURCES",
    "TAG_SOURCE_SCORE",
    "TAG_STAGE",
    "RegistrationResult",
    "TrackingError",
    "beats",
    "champion_decision",
    "code_version",
    "current_run_id",
    "decision_line",
    "ensure_experiment",
    "flatten_params",
    "fusion_markdown",
    "fusion_run",
    "is_secret_key",
    "load_registered",
    "log_and_register_model",
    "log_artifact",
    "log_figure",
    "log_fusion_inputs",
    "log_json",
    "log_metrics",
    "model_version_url",
    "readable_run_name",
    "redact",
    "run_url",
    "set_description",
    "set_tags",
    "stage_run",
]
