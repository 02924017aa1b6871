# Two commands: `make run` serves, `make test` tests. Both build the virtualenv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test bench install-system clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

run: $(VENV)/.installed
	bash scripts/run.sh

test: $(VENV)/.installed
	bash scripts/install_system.sh redis-server chromium
	$(PY) -m pytest $(PYTEST_ARGS)

install-system:
	bash scripts/install_system.sh redis-server chromium

clean:
	rm -rf $(VENV) .redis .pytest_cache

bench: $(VENV)/.installed
	bash scripts/install_system.sh redis-server
	TF_CPP_MIN_LOG_LEVEL=3 $(PY) bench.py $(BENCH_ARGS)
