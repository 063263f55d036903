# The verbs a user needs. Each target makes its own virtualenv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test fuzz bench soak proto lint clean

$(STAMP): setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# AUTO_MTLS=1: the host launches every plugin with automatic mTLS (HostConfig.auto_mtls).
AUTO_MTLS ?=
demo: $(STAMP)
	$(PY) -m samples.demo $(if $(filter-out 0,$(AUTO_MTLS)),--auto-mtls)

test: $(STAMP)
	$(PY) -m pytest -q

# Hypothesis against a host and a plugin in subprocesses, fresh cases each run; also
# checks their logs stay clean and their RSS comes back (tests/test_fuzz.py).
FUZZ_EXAMPLES ?= 20000
fuzz: $(STAMP)
	CONNECTPLUGIN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) CONNECTPLUGIN_FUZZ_SEED=random \
		$(PY) -m pytest -q -s -p no:cacheprovider --timeout=0 tests/test_fuzz.py

bench: $(STAMP)
	$(PY) -m bench

# 16 routed callers for 60 s while a supervised plugin is SIGKILLed every 10 s (bench/soak.py);
# prints calls, errors, p50/p99, host and plugin RSS and threads; fails unless flat and clean.
soak: $(STAMP)
	$(PY) -m bench.soak

proto: $(STAMP)
	$(PY) -m connectplugin.codegen

lint: $(STAMP)
	$(PY) -m ruff check connectplugin tests samples bench
	$(PY) -m mypy connectplugin

clean:
	rm -rf $(VENV) build *.egg-info
