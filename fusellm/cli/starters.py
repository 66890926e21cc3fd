"""Starter fusion configs that `fusellm init` writes: a tiny CPU fusion, and the paper's 7B recipe.

Kept as text, comments included, because the comments are half of a starter: what to fill in
and what to run next. configs/fusellm-7b.yaml is `fusellm init --recipe 7b` written there
(tests/test_cli_plan.py keeps the two equal); `{path}` stands for the file being written.
"""

from __future__ import annotations

TINY = """\
# yaml-language-server: $schema=fusion.schema.json
# A tiny fusion that runs on one CPU in minutes: two small causal LMs with different tokenizers
# fused into the first one. Written by `fusellm init --recipe tiny`.
#
# Fill in these paths first (relative paths are relative to this file):
#   models/base/   a small Hugging Face causal LM: config.json, *.safetensors and its tokenizer
#                  files, as `save_pretrained` writes them (model and tokenizer); the target
#   models/other/  a second small causal LM, any architecture and any tokenizer
#   corpus/        the fusion texts: .txt files (one document each), or .jsonl / .parquet files
#                  with a "text" field; a few hundred kilobytes are plenty
#   eval/          held-out data of the `local` suite: one {"text": ...} per line in
#                  eval/fusellm/local/docs/test.jsonl, .../code/test.jsonl and
#                  .../docstrings/test.jsonl, and {"question": ..., "choices": [...],
#                  "answer": <index>} per line in eval/fusellm/local/mc/test.jsonl
#
# Then:
#   fusellm validate {path}
#   fusellm plan {path}
#   fusellm run {path}
#
# `validate` reports missing paths as warnings and every other problem as an error; `plan`
# says which stages a run computes and why, and what they cost.
name: tiny-fusion
target:
  uri: models/base
  name: base
sources:
  - uri: models/base  # the target is a source too: its own distribution is a candidate
    name: base
  - uri: models/other
    name: other
corpus:
  uri: corpus
  text_field: text
pieces:
  block_size: 256  # at most the smallest context window of the models
  margin: 8
extraction:
  top_k: 10
  batch_size: 8
  shard_size: 256
  device: cpu
fusion:
  method: min_ce
  granularity: sequence
training:
  lam: 0.9
  learning_rate: 1.0e-4
  warmup_ratio: 0.05
  global_batch: 8
  micro_batch: 4
  max_length: 256
  max_steps: 100
  zero_stage: 0
  gradient_checkpointing: false
  checkpoint_every: 50
evaluation:
  suites: [local]
  data_dir: eval
  limit: 50
tracking:
  experiment: tiny-fusion
  registered_model: tiny-fused
workdir: tiny-fusion-work
"""

SEVEN_B = """\
# yaml-language-server: $schema=fusion.schema.json
# FuseLLM-7B, the paper's recipe (Wan et al., ICLR 2024, §4.1): continual training of Llama-2-7B
# on MiniPile with the fused top-10 next-token distributions of three sources of different
# architectures and tokenizers (Llama-2 itself, OpenLLaMA-7B v2, MPT-7B).
#
#   fusellm validate {path}
#   fusellm plan {path}
#   fusellm run {path}
#
# `validate` reports every problem at once and writes nothing; `plan` says which stages a run
# computes and why, the top-k store size and the GPU-hours (docs/planning.md), offline too.
#
# Needs GPUs with bf16 (the paper: 8 x A100 40GB), the Hub (or a pre-filled Hugging Face cache
# with HF_HUB_OFFLINE=1) and accepted Llama-2 licence terms. The stages run as Prefect tasks,
# so extraction shards can spread over a GPU work pool; see README "The real recipe on GPUs".
name: fusellm-7b
target:
  uri: hf://meta-llama/Llama-2-7b-hf
  name: llama-2-7b
  dtype: bfloat16
sources:
  - uri: hf://meta-llama/Llama-2-7b-hf
    name: llama-2-7b
    dtype: bfloat16
  - uri: hf://openlm-research/open_llama_7b_v2
    name: open-llama-7b-v2
    dtype: bfloat16
  - uri: hf://mosaicml/mpt-7b
    name: mpt-7b
    dtype: bfloat16
    trust_remote_code: true  # MPT's modelling code lives in its Hub repository
corpus:
  uri: hf://datasets/JeanKaddour/minipile
  split: train
  text_field: text
pieces:
  block_size: 2048
  margin: 48  # room for each model's special tokens
extraction:
  top_k: 10
  batch_size: 8
  shard_size: 1024
  device: cuda
  token_ce: true
fusion:
  method: min_ce
  granularity: sequence
  ce_unit: byte  # nats per byte: comparable across tokenizers
training:
  lam: 0.9
  temperature: 1.0
  learning_rate: 1.0e-5
  lr_scheduler: cosine
  warmup_ratio: 0.008
  adam_betas: [0.9, 0.95]
  weight_decay: 0.1
  max_grad_norm: 1.0
  global_batch: 128
  micro_batch: 4
  max_length: 2048
  epochs: 1
  bf16: true
  zero_stage: 2
  gradient_checkpointing: true
  checkpoint_every: 500
  seed: 42
evaluation:
  suites: [bbh, commonsense, multipl-e]
  batch_size: 8
  sources: true
  baseline: true
tracking:
  experiment: fusellm-7b
  registered_model: fusellm-7b
  primary_suite: bbh
planning:  # for `fusellm plan` while the models are not downloaded (docs/planning.md)
  parameters:
    llama-2-7b: 6.74e+9
    open-llama-7b-v2: 6.74e+9
    mpt-7b: 6.65e+9
  corpus_tokens: 1.8e+9  # MiniPile's train split in Llama-2 tokens
workdir: fusellm-7b-work
"""

STARTERS = {"tiny": TINY, "7b": SEVEN_B}


def starter(recipe: str, path: str) -> str:
    """The starter config `recipe` as it reads when written to `path`."""
    return STARTERS[recipe].replace("{path}", path)
