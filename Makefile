# sparse-serve: the two quickstart commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= smollm2-135m-instruct
PROMPT ?= What is the capital of France?

.PHONY: setup demo test test-unit loadtest clean

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

# Load test: SmolLM2 dense vs the Wanda 70% checkpoint (pruned into the cache on first use) on 127.0.0.1,
# profile chat, 1/4/8 users, each level bounded in requests and 60 s; report in loadtests/results/.
# Add variants (e.g. a FLAP checkpoint) with LOADTEST_ARGS="--variants dense=... sparse=... flap=...".
LOADTEST_ARGS ?=
loadtest: setup
	$(BIN)/python -m loadtests.run $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
