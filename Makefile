# Set-up and the two everyday commands. torch goes in first: a bare `pip install torch` would pull CUDA wheels.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: install demo lint test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,bench]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/ray-render run jobs/examples/prompts.parquet --out out/demo

lint: install
	$(VENV)/bin/ruff check .

test: install
	$(PY) -m pytest -q --durations=15

bench: install
	$(VENV)/bin/ray-render bench --repeat 3 --out bench-results/full --check

clean:
	rm -rf out bench-results
