# backprop: developer tasks. Every target runs inside ./.venv, which `make` creates
# and keeps in sync with pyproject.toml by itself (see `venv` below).
#
#   make test        ruff check, ruff format --check, mypy, then pytest (+ notebooks)
#   make lint        ruff check, ruff format --check, mypy
#   make format      ruff format, then ruff check --fix
#   make demo        python -m backprop demo $(ARGS); installs only the package and its
#                    plot and progress extras (no linters, no Jupyter)
#   make notebooks   re-execute every notebooks/*.ipynb in place (outputs saved)
#   make bench       python benchmarks/run.py $(ARGS), BLAS pinned to one thread
#   make clean       remove .venv and every cache
#
# Pass arguments with ARGS, e.g. `make demo ARGS="--epochs 3"`.

SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
ARGS   ?=

NOTEBOOKS := $(wildcard notebooks/*.ipynb)

.PHONY: venv venv-demo test lint format demo notebooks bench clean

# ------------------------------------------------------------------ environment

# `venv` (everything a developer needs: the dev extra) is what the other targets depend
# on; `venv-demo` (the package with its plot and progress extras only) is what `make
# demo` needs, a much smaller install. Each stamp file is rebuilt (pip install runs
# again) only when pyproject.toml is newer than it, so a repeated `make test` is fast;
# the dev install covers the demo's too. A half-made .venv (no pip, e.g. after a failed
# `python3 -m venv`) is removed and made again. A stamp is only written once
# backprop/__init__.py exists: an editable install made before that maps no package and
# has to be redone.
venv: $(STAMP)
venv-demo: $(DEMO_STAMP)

define make_venv
	@if [ ! -x $(BIN)/pip ]; then \
	  rm -rf $(VENV); \
	  echo "creating $(VENV) with $$($(PYTHON) --version 2>&1 | head -n 1)"; \
	  if ! $(PYTHON) -m venv $(VENV); then \
	    rm -rf $(VENV); \
	    echo >&2; \
	    echo "error: '$(PYTHON) -m venv' failed. On Debian/Ubuntu the venv module (ensurepip)" >&2; \
	    echo "is packaged separately; install it with:  apt-get install python3-venv" >&2; \
	    exit 1; \
	  fi; \
	fi
endef

define stamp
	@if [ -f backprop/__init__.py ]; then touch $(1); else \
	  echo "note: backprop/__init__.py does not exist yet, so the editable install cannot map"; \
	  echo "the package; the install will be redone once it exists."; fi
endef

$(STAMP): pyproject.toml
	$(make_venv)
	$(BIN)/pip install --disable-pip-version-check --progress-bar off -e '.[dev]'
	$(call stamp,$(STAMP) $(DEMO_STAMP))

$(DEMO_STAMP): pyproject.toml
	$(make_venv)
	$(BIN)/pip install --disable-pip-version-check --progress-bar off -e '.[plot,progress]'
	$(call stamp,$(DEMO_STAMP))

# ------------------------------------------------------------------ checks

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy backprop

# pytest exits 5 when it collected no test at all (e.g. an empty tests/ early in the
# project); that is not a failure of the code, so it is turned into success here.
# Notebooks in notebooks/ are executed by nbmake as tests when there are any.
# --timeout (pytest-timeout) makes a hung test fail with a traceback instead of eating
# CI's time budget; it is given here, not in pyproject.toml, so that a plain `pytest`
# without the plugin installed does not trip over an unknown option.
PYTEST_TIMEOUT ?= 600

test: lint
	@nb_args=""; \
	if [ -n "$(NOTEBOOKS)" ]; then nb_args="--nbmake notebooks"; fi; \
	cmd="$(BIN)/pytest --timeout=$(PYTEST_TIMEOUT) tests $$nb_args"; \
	echo "$$cmd"; \
	rc=0; $$cmd || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): treated as success"; rc=0; fi; \
	exit $$rc

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# ------------------------------------------------------------------ running

# The demo's matrix products are small (a 64×64 minibatch times 64×256): a second
# BLAS thread gains nothing on them, and on a busy 2-core machine it makes every
# product wait for the other core. A thread count set by the caller is kept.
demo: venv-demo
	OPENBLAS_NUM_THREADS=$${OPENBLAS_NUM_THREADS:-1} $(BIN)/python -m backprop demo $(ARGS)

# `jupyter execute` comes with nbclient; it runs each notebook headless and, with
# --inplace, writes the outputs back into the file.
notebooks: venv
ifeq ($(strip $(NOTEBOOKS)),)
	@echo "no notebooks/*.ipynb: nothing to execute"
else
	$(BIN)/jupyter execute --inplace $(NOTEBOOKS)
endif

# The benchmark measures single-threaded kernels: pin every BLAS/OpenMP pool.
bench: venv
	OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
	  $(BIN)/python benchmarks/run.py $(ARGS)

clean:
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache .pytest_cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
