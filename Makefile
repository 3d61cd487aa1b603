# servetune developer interface: make demo | test | lint | bench
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-unit lint bench clean

$(STAMP): pyproject.toml uv.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/uv || $(BIN)/pip install --quiet --disable-pip-version-check uv
	$(BIN)/uv sync --frozen --python $(BIN)/python
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/servetune demo

test: $(STAMP)
	$(BIN)/pytest

test-unit: $(STAMP)
	$(BIN)/pytest tests/unit

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

# PEERS=/tmp/peers (a virtualenv holding aiperf and guidellm) adds the side-by-side comparison.
bench: $(STAMP)
	$(BIN)/python bench/bench_client.py
	$(BIN)/python bench/bench_overhead.py
	$(BIN)/python bench/bench_logs.py
	$(if $(PEERS),$(BIN)/python bench/bench_peers.py --peers $(PEERS))

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
