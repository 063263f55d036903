# The verbs a user needs. Each target makes its own virtualenv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench proto lint clean

$(STAMP): setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m samples.demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench

proto: $(STAMP)
	$(PY) -m connectplugin.codegen

lint: $(STAMP)
	$(PY) -m ruff check connectplugin tests samples bench
	$(PY) -m mypy connectplugin

clean:
	rm -rf $(VENV) build *.egg-info
