# hq-diffusion: every target sets up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow bench app clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch and torchvision are installed first as a matching pair: a CPU-only torch next to
# a CUDA torchvision breaks `import transformers` (see README, Installation).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/hq-diffusion demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/hq-diffusion bench rd

clean:
	rm -rf $(VENV) build *.egg-info
