# servetune developer interface: make demo | test | lint | bench
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-unit lint bench bench-fleet clean redis-server

$(STAMP): pyproject.toml uv.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/uv || $(BIN)/pip install --quiet --disable-pip-version-check uv
	$(BIN)/uv sync --frozen --compile-bytecode --python $(BIN)/python
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/servetune demo

# The fleet's tests start their own redis-server: install Debian's package when it is missing
# (as root with apt-get, as on a fresh CI machine), else say how.
# Bytecode is compiled ahead (uv sync --compile-bytecode, compileall of src): where Python may not
# write its own caches (PYTHONDONTWRITEBYTECODE=1, read-only trees), each of the suite's hundreds
# of CLI, manager, worker and engine processes would otherwise compile every module it imports
# (~0.7 s each).
test: $(STAMP) redis-server
	@$(BIN)/python -m compileall -q src
	$(BIN)/pytest

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server; \
	  else \
	    echo "the fleet tests need redis-server on PATH: sudo apt-get install redis-server (Debian/Ubuntu), brew install redis (macOS)" >&2; exit 1; \
	  fi; }

test-unit: $(STAMP)
	$(BIN)/pytest tests/unit

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

# PEERS=/tmp/peers (a virtualenv holding aiperf and guidellm) adds the side-by-side comparison.
bench: $(STAMP) redis-server
	$(BIN)/python bench/bench_client.py
	$(BIN)/python bench/bench_overhead.py
	$(BIN)/python bench/bench_logs.py
	$(BIN)/python bench/bench_heartbeats.py
	$(if $(PEERS),$(BIN)/python bench/bench_peers.py --peers $(PEERS))

# The demo study locally and on a manager + 2 local workers, at parallel 1 and 2 (well over
# 5 min on 2 cores, so not in `bench`). FLEET_ARGS="--max-trials 6" shortens it.
bench-fleet: $(STAMP) redis-server
	$(BIN)/python bench/bench_fleet_demo.py $(FLEET_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
