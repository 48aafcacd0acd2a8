# Two commands are all the set-up there is: `make demo` and `make test`.
# Both create .venv from pyproject.toml on first use (and again when it changes), and compile the
# request path with mypyc (setup.py) whenever one of those modules changes.
# STICKY_PROXY_PURE=1 make ... runs everything on the interpreted modules instead.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps
MODE   := $(if $(filter-out 0,$(STICKY_PROXY_PURE)),pure,compiled)
STAMP  := $(VENV)/.installed-$(MODE)
# The modules setup.py compiles: pyproject.toml's [tool.sticky-proxy] compiled list.
COMPILED := $(shell $(PYTHON) -c 'import tomllib; \
	print(*tomllib.load(open("pyproject.toml", "rb"))["tool"]["sticky-proxy"]["compiled"])')
ifeq ($(strip $(COMPILED)),)
$(error cannot read [tool.sticky-proxy] compiled from pyproject.toml with $(PYTHON))
endif

.PHONY: demo test lint typecheck unit quick bench clean

$(DEPS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 'setuptools>=77'
	STICKY_PROXY_PURE=1 $(BIN)/pip install -q -e '.[test]'
	touch $@

# Build in place with the venv's own mypy (no isolated build environment to download each time);
# stale extensions go first, so a module dropped from the list is never shadowed by an old one.
$(STAMP): $(DEPS) setup.py $(COMPILED)
	rm -f proxy/*.so proxy__mypyc*.so $(VENV)/.installed-*
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: $(STAMP)
	$(BIN)/sticky-proxy demo

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

# The tests without the slow ones (subprocesses, pods under load), while working on something.
quick: $(STAMP)
	$(BIN)/pytest -m "not slow"

bench: $(STAMP)
	bash bench/setup.sh
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache proxy/*.so proxy__mypyc*.so
