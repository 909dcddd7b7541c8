# Two commands on a fresh machine:
#   make run   - the whole system on this machine (ecpm demo), on embedded defaults;
#                e.g. make run DEMO_ARGS="--break-after 30s" to watch an incident open and resolve
#   make test  - install what the tests need (Python deps in .venv, system peers via apt-get
#                when root), then lint, type-check and run every test
#   make faults  - the fault suite (tests/faults: brokers stopped, monitors and probes killed,
#                a full disk, skewed clocks, monitor replicas on one PostgreSQL; one case at a time) and the ingest fuzz at
#                ECPM_FUZZ_SCALE=10 (105,000 examples); .ci/run runs it after make test
#   make bench   - every benchmark against its peer in the same run (bench/run.py), at issue 14's
#                sizes, BENCH_REPEATS times (3: about 50 min on 2 cores, 1: 24), appended to BENCHMARKS.md
#                as a dated section; BENCH_ONLY=fault_page,report,... for some; a missed goal gets a
#                py-spy profile in bench/profiles/. Their smoke mode runs in make test
#                (tests/test_bench_smoke.py)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

# x 10,500 examples in tests/test_ingest_fuzz.py: 10 makes 105,000 (>= 10^5)
FUZZ_SCALE ?= 10

# make bench: runs of each bench (the median and min–max over them go to BENCHMARKS.md)
BENCH_REPEATS ?= 3
BENCH_ONLY ?=

.PHONY: run test faults bench lint typecheck pytest peers clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/ecpm demo $(DEMO_ARGS)

peers:
	@scripts/install-peers.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test: peers lint typecheck pytest

# tests/faults is left out of the default collection (pyproject.toml norecursedirs) and run here;
# the fuzz runs even when a fault case failed, and the target fails if either did
faults: peers $(STAMP)
	@status=0; \
	$(PY) -m pytest tests/faults -p no:cacheprovider $(FAULTS_ARGS) || status=1; \
	ECPM_FUZZ_SCALE=$(FUZZ_SCALE) $(PY) -m pytest tests/test_ingest_fuzz.py -p no:cacheprovider \
		--timeout 1200 || status=1; \
	exit $$status

bench: peers $(STAMP)
	$(PY) -m bench.run --repeats $(BENCH_REPEATS) $(if $(BENCH_ONLY),--only $(BENCH_ONLY))

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
