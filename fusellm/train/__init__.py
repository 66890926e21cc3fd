"""Training stage: DeepSpeed continual training of the target with the fusion objective.

`train(config, model_dir_or_model, data_dir, output_dir)` in-process, or
`python -m fusellm.train CONFIG --model DIR --data DIR --output DIR` under a launcher.
Names resolve lazily so that the command line starts without importing torch.
"""

from importlib import import_module

_EXPORTS = {
    "TrainConfig": "fusellm.train.config",
    "TrainConfigError": "fusellm.train.config",
    "load_config": "fusellm.train.config",
    "TrainResult": "fusellm.train.engine",
    "train": "fusellm.train.engine",
}
__all__ = ["TrainConfig", "TrainConfigError", "TrainResult", "load_config", "train"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fusellm.train' has no attribute {name!r}")
