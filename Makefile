# The README's two commands: `make demo` and `make test`. Each creates the
# virtualenv if it is missing and installs the package into it (editable).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2
# Keep freed CPU memory for reuse instead of page-faulting it back every step
# (docs/performance.md). The tests run with TensorFlow's default allocator, as
# a user's own script would.
export TF_CPU_ALLOCATOR_USE_BFC ?= true
test test-slow: export TF_CPU_ALLOCATOR_USE_BFC := false
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-slow bench lint venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python setup.py
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/keras-moe demo

lint: $(STAMP)
	$(BIN)/ruff check .

# Test worker processes: one per core, at most 4 (each holds its own
# TensorFlow, about 1-2 GiB). Whole files go to one worker, so module-scoped
# fixtures are built once.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

# `make test`: every test not marked `slow`, under 8 minutes on 2 idle cores.
# `make test-slow`: the longer end-to-end and learning checks (docs/testing.md);
# CI runs both. pytest exits 5 when a selection holds no test: not a failure.
# Under CI=true the HTML report's test needs Chromium (README, Testing): say
# so at once rather than after the suite.
test: $(STAMP)
	@if [ "$$CI" = "true" ] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then \
	    echo "make test: CI=true needs chromium for tests/pipelines/inspection/report_test.py (apt-get install chromium; .ci/run installs it)" >&2; exit 2; fi
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m slow tests || [ $$? -eq 5 ]

bench: $(STAMP)
	$(BIN)/python benchmarks/moe_layer.py
	$(BIN)/python benchmarks/lm_throughput.py
	$(BIN)/python benchmarks/translate_throughput.py
	$(BIN)/python benchmarks/distributed.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache runs
