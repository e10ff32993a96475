# hq-diffusion: every target sets up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser demo test test-slow mutation bench app clean

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

# Headless Chromium + ChromeDriver for the browser tests (Debian packages; needs root, as in CI).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "note: chromium/chromedriver not installed and not root: browser tests will be skipped"; fi

test: $(STAMP) browser
	$(BIN)/pytest -q

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

# Mutation audit: small deliberate bugs applied one at a time to a scratch copy (scripts/mutation.py);
# reports caught / survived / stale per mutation and the score. Several minutes.
mutation: $(STAMP)
	$(BIN)/python scripts/mutation.py

bench: $(STAMP)
	$(BIN)/hq-diffusion bench rd
	$(BIN)/hq-diffusion bench speed
	$(BIN)/hq-diffusion bench tails

app: $(STAMP)
	$(BIN)/hq-diffusion app

clean:
	rm -rf $(VENV) build *.egg-info
