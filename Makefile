# Two commands: `make run` serves, `make test` tests. Both build the virtualenv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test test-fast lint bench install-system clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

run: $(VENV)/.installed
	bash scripts/run.sh

test: $(VENV)/.installed lint
	bash scripts/install_system.sh redis-server chromium faketime
	$(PY) -m pytest $(PYTEST_ARGS)

# The unit tests alone (fakeredis and a private redis-server, no model, no service processes): seconds.
test-fast: $(VENV)/.installed
	bash scripts/install_system.sh redis-server
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

install-system:
	bash scripts/install_system.sh redis-server chromium faketime

clean:
	rm -rf $(VENV) .redis .pytest_cache

bench: $(VENV)/.installed
	bash scripts/install_system.sh redis-server
	TF_CPP_MIN_LOG_LEVEL=3 $(PY) bench.py $(BENCH_ARGS)
