# Everything a fresh machine needs: `make demo` runs the example sweep, `make test` the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv tools demo test test-all lint bench bench-scale clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# promtool and prometheus for the alert-rule and scrape tests: Debian's package, installed
# when missing (with sudo unless root). Its own service, if the package started one, is
# stopped: the tests start their own servers on free ports and must not find one on 9090.
# tmux, likewise from Debian: the terminal of a set width that the progress bar's test
# runs `tidegate run` in.
tools:
	@command -v promtool >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus; \
	  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then \
	    $$SUDO systemctl disable --now prometheus || true; fi; }
	@command -v tmux >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends tmux; }

demo: $(STAMP)
	$(VENV)/bin/tidegate run examples/sir/job.yaml

test: $(STAMP) tools
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -n 2 --dist loadfile --durations=25

test-all: $(STAMP) tools
	$(PY) -m pytest -n 2 --dist loadfile --durations=25 -m "slow or not slow"

# BENCH_ARGS: flags for python -m bench, e.g. BENCH_ARGS="--light --scenarios pile-up".
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench $(BENCH_ARGS)

# The code is wrapped by hand (ruff's line length, checked by ruff check), not by
# ruff format, whose check has not passed since the skeleton.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

clean:
	rm -rf $(VENV) examples/sir/results .pytest_cache .ruff_cache

# The 10^6-param grid through `tidegate run` against the same job at 10^4 (scheduler
# and workers out of process): start-up, peak RSS, wall; then a resume with 900,000 of
# them committed, with and without the ledger's watermark; then a 10^6-row params file
# (.csv, .parquet, .jsonl) loaded and started, against expanding it row by row. Long
# (about 40 minutes on 2 cores); reported on its own in
# bench/results/{scale,resume_scale,file_scale}.json and docs/BENCHMARKS.md.
bench-scale: $(STAMP)
	$(PY) -m bench.scale $(BENCH_SCALE_ARGS)
	$(PY) -m bench.resume_scale
	$(PY) -m bench.file_scale
