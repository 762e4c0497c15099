# Two commands: `make demo` and `make test`. Both create .venv when missing and install in the order
# the stack needs: torch + torchvision first, then the rest, then deepspeed (its build imports torch).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean readme

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q --no-build-isolation deepspeed
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/llava-pipeline run --config configs/tiny-demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf runs

readme:
	$(PY) docs/build_readme.py
