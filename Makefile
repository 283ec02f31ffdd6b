# Two entry points on a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed first: pip takes its CPU build from local disk here, whereas an open
# range would pull the multi-GB CUDA build from the index.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FORGE := $(VENV)/bin/dolphin-forge
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev,eval,serve]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(FORGE) models fetch-default
	bash examples/demo.sh

test: venv
	$(FORGE) models fetch-default
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
