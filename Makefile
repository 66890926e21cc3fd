# Two entry points: `make demo` and `make test`. Both create .venv on first use.
# Inner loop: `make test-fast` (the suite without tests marked slow) and `make lint`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build by default; GPU users pass their own, e.g.
#   make demo TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast test-gpu lint demo demo-real demo-chat bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[all,dev]"
	touch $(STAMP)

# Tests marked gpu need a CUDA device (and vLLM where they say so): pytest leaves them out
# unless asked (pyproject.toml); `make test-gpu` runs them.
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=30

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

lint: $(STAMP)
	$(BIN)/ruff check .

demo: $(STAMP)
	$(BIN)/fusellm demo

# Three real pretrained LLMs (fetched once into ~/.cache/fusellm), ~45 minutes on 2 cores.
demo-real: $(STAMP)
	$(BIN)/fusellm demo --real --out fusellm-demo-real

# The demo as chat models (FuseChat): conversations, pairwise fusion, then a merge.
demo-chat: $(STAMP)
	$(BIN)/fusellm demo --chat --out fusellm-demo-chat

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) fusellm-demo fusellm-demo-real fusellm-demo-chat
