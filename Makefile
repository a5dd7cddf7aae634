# sparse-serve: the two quickstart commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= smollm2-135m-instruct
PROMPT ?= What is the capital of France?

.PHONY: setup demo test test-unit clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# Build the bundled model, evaluate it (bounded: 8 windows of 1024 tokens, 100 PIQA items), answer one chat message.
demo: setup
	$(BIN)/sparse-compress models fetch $(MODEL)
	$(BIN)/sparse-compress eval $(MODEL) --max-windows 8 --tasks piqa --limit 100
	$(BIN)/sparse-serve $(MODEL) --prompt "$(PROMPT)"

# The whole suite: unit tests (tiny random model) and integration tests (SmolLM2, marked slow).
test: setup
	$(BIN)/python -m pytest -q --timeout 1800

test-unit: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
