"""The model card of a trained target: which sources, which corpus, which config, which code.

A fused model is only reproducible with all four, so they travel with the weights as README.md
(Hugging Face model card format, YAML metadata on top).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

import fusellm


def code_version() -> str:
    """Package version plus the git commit of the source tree, when there is one."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(fusellm.__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"fusellm {fusellm.__version__}" + (f" ({commit})" if commit else "")


def model_card(*, base_model: str, data_meta: dict, data_dir: str, config: dict, steps: int) -> str:
    """Render the card; `data_meta` is the fused store's manifest meta (sources, corpus...)."""
    sources = list(data_meta.get("sources") or [])
    corpus = data_meta.get("corpus") or data_dir
    method = (
        "CLM continual training (baseline)" if config["lam"] == 1 else "FuseLLM knowledge fusion"
    )
    data = ModelCardData(
        library_name="transformers",
        tags=["fusellm", "knowledge-fusion" if config["lam"] < 1 else "continual-pretraining"],
        base_model=base_model if "/" in base_model and not Path(base_model).exists() else None,
    )
    body = "\n".join(
        [
            f"# {method}",
            "",
            f"- **Target (initial weights):** `{base_model}`",
            f"- **Sources:** {', '.join(f'`{s}`' for s in sources) or 'none recorded'}",
            f"- **Corpus / fused data:** `{corpus}`",
            f"- **Optimizer steps:** {steps}",
            f"- **Code version:** {code_version()}",
            "",
            "## Training config",
            "",
            "```yaml",
            yaml.safe_dump(config, sort_keys=True).strip(),
            "```",
            "",
            "## Fused data metadata",
            "",
            "```yaml",
            yaml.safe_dump(data_meta, sort_keys=True).strip(),
            "```",
            "",
        ]
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
