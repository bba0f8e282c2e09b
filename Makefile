# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch lies on this machine's disk; users with GPUs install their own torch first
# (any torch>=2.1 already in the venv is kept).
TORCH  ?= torch==2.13.0

.PHONY: demo test install lint clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/mergemix propose recipes/demo.yaml

test: install
	$(VENV)/bin/ruff check mergemix tests benchmarks
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check mergemix tests benchmarks

clean:
	rm -rf runs .pytest_cache
