"""Merging models of one architecture in parameter space, through mergekit (docs/merging.md).

FuseChat's second step: the pairwise fused models (the pivot trained towards each source) are
merged onto the pivot. Every method here is mergekit's own, run through its Python API
(`MergeConfiguration`, `run_merge`); this module only chooses the defaults, checks the inputs
and writes the result atomically. Nothing of the algorithms is re-implemented here.

Unlike the rest of `fusellm.method`, this reads and writes model folders: mergekit works on
folders. It needs the `merge` extra (`pip install 'fusellm[merge]'`); importing this module
does not, so the config can name its parameters without mergekit installed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

METHODS = ("sce", "ties", "dare_ties", "task_arithmetic", "linear")

# Method -> the parameters it takes, by our names (`MergeConfig`'s fields).
PARAMETERS: dict[str, tuple[str, ...]] = {
    "sce": ("select_topk",),
    "ties": ("density", "weight", "scale", "normalize"),
    "dare_ties": ("density", "weight", "scale", "normalize", "seed"),
    "task_arithmetic": ("weight", "scale", "normalize"),
    "linear": ("weight", "normalize"),
}
# Our name -> mergekit's; `seed` is MergeOptions.random_seed, not a method parameter.
MERGEKIT_NAMES = {
    "select_topk": "select_topk",
    "density": "density",
    "weight": "weight",
    "scale": "lambda",
    "normalize": "normalize",
}
# Defaults (docs/merging.md says why). `weight`: 1/K for each of the K models.
DEFAULTS = {"select_topk": 0.1, "density": 0.5, "scale": 1.0, "seed": 0}
NORMALIZE = {"ties": True, "dare_ties": False, "task_arithmetic": False, "linear": True}
DTYPES = ("float32", "bfloat16", "float16")
INSTALL = "pip install 'fusellm[merge]'"
RECORD = "merge.json"


class MergeError(ValueError):
    """A merge cannot run as asked; the message names the field, the model or the tensor."""


def resolve_parameters(method: str, parameters: Mapping, models: int) -> dict:
    """Every parameter `method` takes, defaults filled in, `weight` as one value per model.

    `parameters` uses our names; None means "the default". A name the method does not take,
    a value out of range or a weight list of the wrong length is a `MergeError` naming
    ``merge.<field>``. Stage keys hold this result, so a default spelled out changes no key.
    """
    if method not in METHODS:
        raise MergeError(f"merge.method: {method!r} is not one of {', '.join(METHODS)}")
    given = {name: value for name, value in parameters.items() if value is not None}
    takes = PARAMETERS[method]
    for name in given:
        if name not in takes:
            raise MergeError(
                f"merge.{name}: method {method} does not take {name}; it takes {', '.join(takes)}"
            )
    if models < 1:
        raise MergeError("models: at least one model to merge onto the pivot")
    out: dict = {}
    for name in takes:
        value = given.get(name)
        if name == "weight":
            out[name] = _weights(value, models)
        elif name == "normalize":
            out[name] = NORMALIZE[method] if value is None else bool(value)
        elif name == "seed":
            out[name] = int(DEFAULTS[name] if value is None else value)
        else:
            out[name] = float(DEFAULTS[name] if value is None else value)
    for name in ("select_topk", "density"):
        if name in out and not 0 < out[name] <= 1:
            raise MergeError(f"merge.{name}: {out[name]} is not in (0, 1]")
    if out.get("normalize") and "weight" in out and sum(out["weight"]) == 0:
        raise MergeError(
            f"merge.weight: the weights sum to 0, and {method} with normalize divides by their sum"
        )
    return out


def _weights(value, models: int) -> list[float]:
    if value is None:
        return [1.0 / models] * models
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    if values is None:
        values = [value] * models
    elif len(values) != models:
        raise MergeError(f"merge.weight: {len(values)} weights for {models} models")
    try:
        weights = [float(v) for v in values]
    except (TypeError, ValueError):
        raise MergeError(f"merge.weight: {value!r} is not a number or a list of numbers") from None
    if not all(math.isfinite(w) for w in weights):
        raise MergeError(f"merge.weight: {value!r} is not finite")
    return weights


# ---------------------------------------------------------------------------------------------
# Checking the inputs before mergekit reads them


def _config(folder: Path, what: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise MergeError(f"{what} ({folder}): no config.json; not a model folder")
    return json.loads(path.read_text())


def _tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape from the safetensors headers (no weights read); None without any."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - a safetensors handle is not iterable
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def check_models(pivot: Path, models: Sequence[Path]) -> None:
    """Every model has the pivot's architecture and exactly its tensors, shape for shape.

    mergekit would fail too, but naming neither the model nor, for a missing tensor, what
    differs; these errors name both.
    """
    if not models:
        raise MergeError("models: at least one model to merge onto the pivot")
    base = _config(pivot, "pivot")
    arch = (base.get("model_type"), base.get("architectures"))
    shapes = _tensor_shapes(pivot)
    for i, folder in enumerate(models):
        what = f"models[{i}] ({folder})"
        config = _config(folder, what)
        other = (config.get("model_type"), config.get("architectures"))
        if other != arch:
            raise MergeError(
                f"{what}: architecture {_arch(other)}, the pivot ({pivot}) is {_arch(arch)}; "
                "only models of the pivot's architecture merge onto it"
            )
        theirs = _tensor_shapes(folder)
        if shapes is None or theirs is None:
            continue  # not safetensors: mergekit checks what it reads
        for name, shape in shapes.items():
            if name not in theirs:
                raise MergeError(f"{what}: has no tensor {name!r}, which the pivot has")
            if theirs[name] != shape:
                raise MergeError(
                    f"{what}: tensor {name!r} has shape {list(theirs[name])}, the pivot's "
                    f"is {list(shape)}"
                )
        extra = sorted(set(theirs) - set(shapes))
        if extra:
            raise MergeError(f"{what}: has tensor {extra[0]!r}, which the pivot has not")


def _arch(pair) -> str:
    model_type, architectures = pair
    return "/".join(architectures or []) or str(model_type)


# ---------------------------------------------------------------------------------------------
# The merge


def _mergekit():
    try:
        import mergekit.merge  # noqa: F401
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] != "mergekit":
            raise
        raise ModuleNotFoundError(
            f"merging models needs mergekit, which is not installed: {INSTALL}", name="mergekit"
        ) from None
    from mergekit import merge_methods

    return merge_methods


def _check_mergekit_method(merge_methods, method: str, resolved: dict) -> None:
    """Our parameter names must be mergekit's for this method: a mergekit release that renamed
    one would otherwise ignore it silently (mergekit skips names it does not know)."""
    spec = merge_methods.get(method).spec
    known = {p.name for p in spec.parameters}
    missing = [MERGEKIT_NAMES[n] for n in resolved if n in MERGEKIT_NAMES]
    missing = [n for n in missing if n not in known]
    if missing:
        raise RuntimeError(
            f"mergekit's {method} has no parameter {', '.join(missing)} (it takes "
            f"{', '.join(sorted(known))}); this mergekit is not the one fusellm was written for"
        )


@contextmanager
def _own_random_state():
    """mergekit seeds Python's, numpy's and torch's global generators (DARE's random drop);
    put them back afterwards, as they were."""
    import random

    import numpy as np
    import torch

    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def _unlisted(arch, model_config, held: set[str]) -> list[str]:
    """The tensors mergekit's list `arch` requires that `held` (a model's names) lacks."""
    weights = arch.all_weights(model_config)
    return [w.name for w in weights if not w.optional and not ({w.name, *(w.aliases or ())} & held)]


def _stale_list_error(architecture: str, missing: list[str], folder) -> MergeError:
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return MergeError(
        f"mergekit cannot merge {architecture} checkpoints as transformers saves them today: "
        f"its list of the architecture's tensors names {shown}, which {folder} does not hold. "
        f"Fuse with fusion.mode: joint, or choose a pivot of another architecture "
        f"(docs/merging.md)"
    )


def check_pivot(pivot: Path, trust_remote_code: bool = False) -> None:
    """Before the pairwise trainings, not hours later at the merge: mergekit is installed and
    can merge models of the pivot's architecture as our training saves them (the tensors a
    model of the pivot's config holds, built on the meta device: no weights are read)."""
    _mergekit()
    import torch
    from mergekit.architecture import arch_info_for_config
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(pivot, trust_remote_code=trust_remote_code)
    arch = arch_info_for_config(config)
    if arch is None:  # no list: mergekit infers the architecture from the checkpoints
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    missing = _unlisted(arch, config, set(model.state_dict()))
    if missing:
        raise _stale_list_error(config.architectures[0], missing, f"a model trained from {pivot}")


def _check_listed_tensors(config, options, refs: list, folders: Mapping[str, Path]) -> None:
    """mergekit merges by its JSON list of an architecture's tensors and stops at the first
    listed tensor a model lacks, deep inside the merge. Some lists are older than what
    transformers saves today (GPT-NeoX's names ``attention.bias`` and ``masked_bias``, buffers
    that checkpoints written by transformers 4.3x and later, every model our training saves,
    do not hold): say so up front, naming the architecture, the tensors and the model's folder
    (`refs`: the pivot first; `folders`: each one's link path -> its folder)."""
    from mergekit.architecture import get_architecture_info
    from mergekit.architecture.auto import get_model_tensor_names

    arch = get_architecture_info(config, options)
    for ref in refs:
        held = set(get_model_tensor_names(ref, options))
        model_config = ref.config(trust_remote_code=options.trust_remote_code)
        missing = _unlisted(arch, model_config, held)
        if missing:
            raise _stale_list_error(model_config.architectures[0], missing, folders[ref.model.path])


def merge_models(
    pivot: Path,
    models: Sequence[Path],
    out: Path,
    *,
    method: str,
    parameters: Mapping | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> dict:
    """Merge `models` onto `pivot` with mergekit's `method`; write the merged model to `out`.

    `parameters`: by our names (`PARAMETERS`; None or absent: the default). The merge runs on
    local folders only (nothing is downloaded), computes and saves in `dtype`, writes
    safetensors, takes the pivot's config and tokenizer, and is written to a temporary folder
    beside `out` that replaces `out` when complete. `linear` averages the models alone: the
    pivot is an input of weight 0, so that its config and tokenizer are the ones kept.
    Returns what `out/merge.json` records.
    """
    if dtype not in DTYPES:
        raise MergeError(f"merge.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    pivot, out = Path(pivot), Path(out)
    models = [Path(m) for m in models]
    resolved = resolve_parameters(method, parameters or {}, len(models))
    check_models(pivot, models)
    merge_methods = _mergekit()
    _check_mergekit_method(merge_methods, method, resolved)
    from importlib import metadata

    from mergekit.common import ModelPath, ModelReference
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import MergeOptions, run_merge

    out.parent.mkdir(parents=True, exist_ok=True)
    # mergekit reads "+" and "@" in a model path as a LoRA and a revision: it sees the inputs
    # through links of plain names. A fresh folder each time: its loader cache is by path.
    links = Path(tempfile.mkdtemp(prefix="fusellm-merge-inputs-"))
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))
    refs = []
    try:
        folders = {}  # mergekit's name for each input -> its folder
        for name, folder in [("pivot", pivot), *((f"model-{i}", m) for i, m in enumerate(models))]:
            (links / name).symlink_to(folder.resolve(), target_is_directory=True)
            refs.append(ModelReference(model=ModelPath(path=str(links / name))))
            folders[str(links / name)] = folder
        config = MergeConfiguration(
            merge_method=method,
            base_model=refs[0],
            models=_inputs(method, resolved, refs),
            parameters={
                MERGEKIT_NAMES[n]: v
                for n, v in resolved.items()
                if n in MERGEKIT_NAMES and n not in ("weight", "density")
            }
            or None,
            dtype=dtype,
            out_dtype=dtype,
        )
        options = MergeOptions(
            device=device,
            lazy_unpickle=False,
            copy_tokenizer=True,
            safe_serialization=True,
            write_model_card=False,
            trust_remote_code=trust_remote_code,
            random_seed=resolved.get("seed"),
            quiet=True,
        )
        # as mergekit-yaml reads it, the inputs by their names above (run_merge rewrites it)
        config_yaml = config.to_yaml().replace(f"{links}{os.sep}", "") + "\n"
        _check_listed_tensors(config, options, refs, folders)
        with _own_random_state():
            run_merge(config, str(work), options)
        record = {
            "method": method,
            "parameters": resolved,
            "dtype": dtype,
            "pivot": str(pivot),
            "models": [str(m) for m in models],
            "mergekit": metadata.version("mergekit"),
        }
        (work / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        (work / "mergekit_config.yml").write_text(config_yaml)
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
        return record
    finally:
        cache = LoaderCache()
        for ref in refs:
            loader = cache.loaders.pop(ref, None)
            if loader is not None:
                loader.flush()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(links, ignore_errors=True)


def _inputs(method: str, resolved: dict, refs: list) -> list[dict]:
    """mergekit's `models:` list: each model with its own weight and density."""
    from mergekit.config import InputModelDefinition

    pivot, *models = refs
    inputs = []
    if method == "linear":  # linear has no base: the pivot counts with weight 0
        inputs.append(InputModelDefinition(model=pivot, parameters={"weight": 0.0}))
    for i, ref in enumerate(models):
        own = {}
        if "weight" in resolved:
            own["weight"] = resolved["weight"][i]
        if "density" in resolved:
            own["density"] = resolved["density"]
        inputs.append(InputModelDefinition(model=ref, parameters=own or None))
    return inputs
