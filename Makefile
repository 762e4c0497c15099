# Two commands: `make demo` and `make test`. Both create .venv when missing and install in the order
# the stack needs: torch + torchvision first, then deepspeed (its build imports torch), then the rest.
# Every package, direct or not, is pinned by constraints.txt: the stack that was tested is the stack that installs.
# After a deliberate upgrade, run the tests and then `make lock` to write the new pins.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PIP     := $(BIN)/pip install -q -c constraints.txt

.PHONY: demo bases test install clean readme lock

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel

$(STAMP): $(BIN)/python setup.cfg pyproject.toml constraints.txt
	$(PIP) torch torchvision
	$(PIP) --no-build-isolation deepspeed
	$(PIP) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/llava-pipeline run --config configs/tiny-demo.yaml

# Rebuild the demo's pretrained tiny CLIP + tiny LLaMA into assets/tiny-bases/ (with manifest.json); see docs/demo.md.
# One torch thread: the shipped bases were built so, and another thread count sums floats in another order.
bases: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/llava-pipeline run --config configs/tiny-bases.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf runs

lock:
	$(BIN)/pip freeze --all --exclude-editable > constraints.txt
