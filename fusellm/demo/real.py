"""The fusion of three real pretrained LLMs at laptop scale (`make demo-real`, docs/real-models.md).

Target SmolLM2-135M-Instruct (Llama, 49,152-entry byte BPE); sources SmolLM2 itself,
Gemma-3-270M (Gemma 3, 262,144-entry SentencePiece-style BPE) and Qwen2.5-Coder-0.5B-Instruct
(Qwen2, 151,936-entry byte BPE, untied head), fetched and converted by `fusellm models fetch`.
The text is the demo's three domains of real writing from CPython's own files (language
reference prose, standard-library code, its docstrings), split by content hash into fusion,
validation and test texts.

Sized for about an hour on 2 CPU cores: ~60 KB of fusion text (20 KB per domain), pieces of
at most 504 tokens, top-10, 12 optimizer steps of 4 pieces. The paper's recipe is λ 0.9, top-10,
MinCE per sequence; the learning rate is higher than its 1e-5 because 12 steps at 1e-5 move a
pretrained model by less than the noise between seeds.
"""

from __future__ import annotations

from pathlib import Path

from fusellm.demo.recipe import DemoRecipe

# short name -> pinned model (fusellm/io/pretrained.yaml)
REAL_MODELS = {
    "smollm2": "smollm2-135m-instruct",
    "gemma3": "gemma-3-270m",
    "qwen-coder": "qwen2.5-coder-0.5b-instruct",
}

REAL_RECIPE = DemoRecipe(
    target="smollm2",
    fusion_bytes=20_000,
    block_size=512,
    margin=8,
    top_k=10,
    lam=0.9,
    learning_rate=1e-4,
    warmup_ratio=0.1,
    batch=4,
    steps=12,
)

# Gemma 3's turn format, for the base checkpoint, which ships no chat template (its instruct
# sibling's, without the tool and image handling): chat corpora need one for every model.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# Real models are large: a Gemma batch of 8 x 512 positions holds 4 GB of logits.
REAL_CONFIG_UPDATES = {"extraction": {"batch_size": 4}, "evaluation": {"batch_size": 2}}
REAL_HELDOUT_BYTES = 8_000  # per domain and part
REAL_SCORE_BATCH = 2


def real_sources(progress: bool = True) -> dict[str, Path]:
    """The three models' folders, fetched and converted into the cache on first use."""
    from fusellm.io.pretrained import ensure_model

    return {
        short: Path(ensure_model(name, progress=progress)) for short, name in REAL_MODELS.items()
    }


def real_config(raw: dict) -> dict:
    """The demo's config (`fusellm.demo.run.demo_config`) adjusted for real models."""
    raw = {**raw, "name": "fusellm-demo-real"}
    for section, values in REAL_CONFIG_UPDATES.items():
        raw[section] = {**raw.get(section, {}), **values}
    raw["tracking"] = {
        **raw["tracking"],
        "experiment": "fusellm-demo-real",
        "registered_model": "fusellm-demo-real-fused",
    }
    return raw


def real_small_config() -> dict:
    """What ``configs/real-small.yaml`` holds: the real recipe's config with the models where
    `fusellm models fetch` puts them and the data where `make demo-real` writes it (paths
    relative to the configs folder). tests/test_real_recipe.py keeps the file equal to this;
    after a change to the recipe, regenerate it (keeping its comment header) with::

        from pathlib import Path
        import yaml
        from fusellm.demo.real import real_small_config
        path = Path("configs/real-small.yaml")
        header = [ln for ln in path.read_text().splitlines(keepends=True) if ln.startswith("#")]
        body = yaml.safe_dump(real_small_config(), sort_keys=False)
        path.write_text("".join(header) + body)
    """
    from fusellm.demo.run import demo_config

    models = Path("~/.cache/fusellm/models")
    data = Path("../fusellm-demo-real/data")
    return real_config(
        demo_config(
            REAL_RECIPE,
            {short: models / name for short, name in REAL_MODELS.items()},
            corpus=data / "corpus.jsonl",
            eval_dir=data / "eval",
            workdir=Path("../fusellm-demo-real/work"),
        )
    )
