"""Run one suite on one model through lm-eval's Python API and keep what MLflow should store.

Order matters: the suite and its data are resolved first, so a missing file, an offline Hub or
a missing chat template is reported before any model is loaded. The output folder is built
under a temporary name and renamed when complete: results.json (our summary),
lm_eval_results.json (lm-eval's own report), samples/<task>.jsonl (lm-eval's per-sample logs)
and tasks/ (task configurations made for this run, e.g. a new `local` domain).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from fusellm.evaluate.data import EvalDataSource, offline_if
from fusellm.evaluate.results import SuiteResult, parse_lm_eval
from fusellm.evaluate.suites import CUSTOM, CustomTasks, resolve
from fusellm.io.files import write_text_atomic


def _model_folder(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model folder {path} has no config.json; expected a Hugging Face model folder "
            "(save_pretrained output)"
        )
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(
            f"model folder {path} has no *.safetensors weights; pickled weights are not loaded "
            "(re-save with save_pretrained(safe_serialization=True))"
        )
    return path


def _document_lm_class():
    """HFLM that scores a whole text (perplexity windows) the way extraction reads a piece.

    lm-eval conditions the first window on `prefix_token_id` and then encodes the text with
    the tokenizer's defaults, so a tokenizer that adds its BOS (Gemma, Llama-2) gets it twice
    and is charged for predicting `<bos>` after `<bos>` (18 nats on Gemma 3). Here the text is
    encoded without special tokens; the prefix is the model's document start.
    """
    from lm_eval.models.huggingface import HFLM

    class DocumentHFLM(HFLM):
        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            saved, self.add_bos_token = self.add_bos_token, False
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            finally:
                self.add_bos_token = saved

    return DocumentHFLM


class BackendUnavailable(RuntimeError):
    """The evaluation backend asked for cannot run here: says what is missing."""


class ChatTemplateMissing(ValueError):
    """Prompts are to be rendered with the model's chat template, and the model has none."""


def require_chat_template(tokenizer, model: str) -> None:
    """Raise, naming `model`, unless its tokenizer has a chat template (lm-eval would fail
    on the first prompt, after loading the model)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateMissing(
            f"evaluation.chat_template: {model} has no chat template (its tokenizer sets none: "
            "no chat_template in tokenizer_config.json, no chat_template.jinja); evaluate "
            "without chat_template, or give the model a template"
        )


def _vllm_lm(folder: Path, tokenizer, frame, batch_size, trust_remote_code):
    """lm-eval's vLLM model over a model folder: for generation-heavy suites on a GPU."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise BackendUnavailable(
            "evaluation.backend: vllm needs the vllm package on the machine that evaluates "
            "(`pip install vllm`, on a CUDA machine); or use backend: hf"
        )
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable(
            "evaluation.backend: vllm needs a CUDA GPU, and this machine has none; "
            "use backend: hf here"
        )
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM(
        pretrained=str(folder),
        tokenizer=str(folder),
        batch_size="auto" if batch_size == 1 else batch_size,
        trust_remote_code=trust_remote_code,
        prefix_token_id=frame.start if frame.start is not None else frame.end,
        add_bos_token=False,  # the frame's start token is the prefix, as with hf
    )


def load_lm(
    model,
    *,
    tokenizer=None,
    batch_size=1,
    device="cpu",
    trust_remote_code=False,
    frame=None,
    backend: str = "hf",
):
    """lm-eval's HFLM (or, with `backend` "vllm", its vLLM model) around a model folder, or
    an HFLM around an in-memory Hugging Face causal LM.

    `frame` (`fusellm.data.framing.DocumentFrame`): its start token conditions texts scored
    from their beginning; default: the tokenizer's own frame.
    """
    from transformers import AutoTokenizer

    from fusellm.data.framing import document_frame

    folder = None
    if isinstance(model, (str, os.PathLike)):
        folder = _model_folder(Path(model))
        model = str(folder)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    elif tokenizer is None:
        raise ValueError("an in-memory model needs its tokenizer (tokenizer=...)")
    frame = frame or document_frame(tokenizer)
    if backend == "vllm":
        if folder is None:
            raise BackendUnavailable("evaluation.backend: vllm loads models from folders only")
        return _vllm_lm(folder, tokenizer, frame, batch_size, trust_remote_code)
    if backend != "hf":
        raise ValueError(f"evaluation backend: expected hf or vllm, got {backend!r}")
    return _document_lm_class()(
        pretrained=model,
        tokenizer=tokenizer,
        device=device,
        batch_size=batch_size,
        trust_remote_code=trust_remote_code,
        prefix_token_id=frame.start if frame.start is not None else frame.end,
    )


def _model_label(model) -> str:
    if isinstance(model, (str, os.PathLike)):
        return Path(model).name
    return getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__


def _write_samples(folder: Path, samples: dict) -> dict[str, int]:
    from lm_eval.utils import handle_non_serializable

    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for task, rows in samples.items():
        text = "".join(json.dumps(r, default=handle_non_serializable) + "\n" for r in rows)
        write_text_atomic(folder / f"{task}.jsonl", text)
        counts[task] = len(rows)
    return counts


def entry_metrics(entries: dict[str, list[str]], higher_is_better: dict) -> dict[str, dict]:
    """Each named task or group of `custom`: its leaf tasks and the metric it is read by (the
    first its first task reports, as lm-eval orders them), with its direction."""
    out = {}
    for name, tasks in entries.items():
        directions = next((higher_is_better[t] for t in tasks if higher_is_better.get(t)), {})
        metric = next(iter(directions), None)
        out[name] = {
            "tasks": tasks,
            "metric": metric,
            "higher_is_better": directions.get(metric) is not False,
        }
    return out


def run_suite(
    model,
    suite: str,
    *,
    output_dir: str | Path,
    tokenizer=None,
    data_dir: str | Path | None = None,
    data: EvalDataSource | None = None,
    tasks: list[str] | None = None,
    limit: float | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    max_gen_toks: int | None = None,
    bootstrap_iters: int = 1000,
    trust_remote_code: bool = False,
    label: str | None = None,
    frame=None,
    backend: str = "hf",
    chat_template: bool = False,
    custom: CustomTasks | None = None,
) -> SuiteResult:
    """Evaluate `model` (a model folder or an in-memory HF causal LM) on `suite`.

    data_dir: local JSONL files in the Hub layout (shortcut for EvalDataSource(data_dir=...));
    tasks: run only these leaf tasks of the suite; limit: at most this many documents per task;
    max_gen_toks: cap generation length (chain-of-thought and code tasks generate long answers);
    frame: the model's document frame (`load_lm`); backend: hf or vllm (`load_lm`);
    chat_template: render prompts with the model's chat template (lm-eval's
    `apply_chat_template`; few-shot examples as turns); custom: what the `custom` suite runs.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    if data is None and data_dir is not None:
        data = EvalDataSource(data_dir=Path(data_dir))
    resolved = resolve(suite, data, tasks, custom)  # every input checked before the model loads
    output_dir = Path(output_dir)
    if chat_template:
        if tokenizer is None and isinstance(model, (str, os.PathLike)):
            from transformers import AutoTokenizer

            folder = _model_folder(Path(model))
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        if tokenizer is not None:
            require_chat_template(tokenizer, label or _model_label(model))
    lm = load_lm(
        model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        device=device,
        trust_remote_code=trust_remote_code,
        frame=frame,
        backend=backend,
    )
    staging = output_dir.with_name(f".{output_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        # lm-eval loads the group from an indexed file (an inline dict would leak group keys into
        # its tasks); the file also records which task configuration and data gave the scores.
        spec_file = staging / "suite_config.yaml"
        spec_file.write_text(yaml.safe_dump(resolved.spec, sort_keys=False))
        for name, config in resolved.task_configs.items():  # e.g. a local domain of the data
            made = staging / "tasks" / f"{name}.yaml"
            made.parent.mkdir(exist_ok=True)
            made.write_text(yaml.safe_dump(config, sort_keys=False))
        manager = TaskManager(
            include_path=[str(p) for p in resolved.include_paths] + [str(staging)],
            include_defaults=resolved.include_defaults,
        )
        with offline_if(data is not None and data.source == "cache"):
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=[resolved.suite.group],
                task_manager=manager,
                limit=limit,
                device=device,
                bootstrap_iters=bootstrap_iters,
                log_samples=True,
                gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
                apply_chat_template=chat_template,
            )
        metrics, stderr = parse_lm_eval(out["results"], resolved.tasks)
        extra: dict = {"chat_template": True} if chat_template else {}
        if suite == "multipl-e":
            from fusellm.evaluate.sandbox import isolation

            extra["sandbox"] = isolation()
        if suite == CUSTOM:
            extra["entries"] = entry_metrics(resolved.entries, out.get("higher_is_better", {}))
        counts = _write_samples(staging / "samples", out.get("samples", {}))
        result = SuiteResult(
            suite=suite,
            model=label or _model_label(model),
            primary_metric=resolved.suite.primary_metric,
            higher_is_better=resolved.suite.higher_is_better,
            metrics=metrics,
            stderr=stderr,
            skipped=resolved.skipped,
            samples_dir=str(output_dir / "samples"),
            n_samples=counts,
            extra=extra,
        )
        from lm_eval.utils import handle_non_serializable

        report = {k: v for k, v in out.items() if k != "samples"}
        write_text_atomic(
            staging / "lm_eval_results.json",
            json.dumps(report, indent=2, default=handle_non_serializable),
        )
        result.save(staging / "results.json")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result
