"""The fusion's data as MLflow dataset inputs: the corpus and the evaluation data.

Logged by reference (`mlflow.data.meta_dataset.MetaDataset`): a name, where the data lives
(a local file or folder, S3, a Hub dataset) and a digest; nothing is read or copied, so logging
a corpus of billions of tokens costs nothing. The run's "Datasets" column and its Inputs show
them; the corpus's content hash is also the run's `fusellm.corpus_sha256` tag.
"""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from fusellm.config import FusionConfig
from fusellm.tracking.current import require_run

CORPUS = "training"  # contexts, as MLflow's UI names them
EVALUATION = "evaluation"


def _source(uri: str, *, split: str | None = None):
    """An MLflow dataset source for a fusellm URI (hf://datasets/..., s3://..., a path)."""
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    from fusellm.io.uris import S3URI, HubURI, parse_uri

    parsed = parse_uri(uri)
    if isinstance(parsed, HubURI):
        return HuggingFaceDatasetSource(path=parsed.repo_id, split=split, revision=parsed.revision)
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source

    where = str(parsed) if isinstance(parsed, S3URI) else str(Path(parsed.path).resolve())
    with warnings.catch_warnings():  # "file" and "" schemes both name local files: the same
        warnings.simplefilter("ignore", UserWarning)
        return resolve_dataset_source(where)


def fusion_datasets(config: FusionConfig) -> list[tuple[object, str]]:
    """(dataset, context) for the corpus and each evaluation suite's data."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    corpus = config.corpus
    out = [(MetaDataset(_source(corpus.uri, split=corpus.split), name="corpus"), CORPUS)]
    data_dir = config.evaluation.data_dir
    for suite in config.evaluation.suites:
        if data_dir is not None:
            source = _source(str(data_dir))
        else:  # lm-eval reads the suite's Hub datasets; their revisions key the evaluation stage
            source = CodeDatasetSource({"suite": suite, "data": "Hugging Face Hub (lm-eval)"})
        out.append((MetaDataset(source, name=f"eval-{suite}"), EVALUATION))
    return out


def log_fusion_inputs(config: FusionConfig, *, run_id: str | None = None) -> list[str]:
    """Log the corpus and the evaluation data as inputs of the run; returns their names."""
    run_id = require_run("log_fusion_inputs", run_id)
    inputs = [
        DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        for dataset, context in fusion_datasets(config)
    ]
    MlflowClient().log_inputs(run_id, datasets=inputs)
    return [i.dataset.name for i in inputs]
