# Two commands on a fresh machine:
#   make run   - the whole system on this machine (ecpm demo), on embedded defaults;
#                e.g. make run DEMO_ARGS="--break-after 30s" to watch an incident open and resolve
#   make test  - install what the tests need (Python deps in .venv, system peers via apt-get
#                when root), then lint, type-check and run every test
#   make faults  - the fault suite (tests/faults: brokers stopped, monitors and probes killed,
#                a full disk, skewed clocks, monitor replicas on one PostgreSQL; one case at a time) and the ingest fuzz at
#                ECPM_FUZZ_SCALE=10 (105,000 examples); .ci/run runs it after make test
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

# x 10,500 examples in tests/test_ingest_fuzz.py: 10 makes 105,000 (>= 10^5)
FUZZ_SCALE ?= 10

.PHONY: run test faults lint typecheck pytest peers clean

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

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
