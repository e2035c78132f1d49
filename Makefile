# Thin aliases over `python -m pipeline`. `make all` / `make test` create the virtual environment first.
# The venv is made with PYTHON: by default the newest supported Python found, as python3.X on PATH or in
# pyenv's versions (a pyenv shim of a version that is not selected does not run, hence both), else python3.
PY_SUPPORTED := 3.13 3.12 3.11
PYENV_ROOT ?= $(HOME)/.pyenv
PY_CANDIDATES = $(foreach v,$(PY_SUPPORTED),python$(v) $(wildcard $(PYENV_ROOT)/versions/$(v).*/bin/python$(v))) python3
PY_MINOR = import sys; print("%d.%d" % sys.version_info[:2])
PYTHON ?= $(shell for p in $(PY_CANDIDATES); do v=$$("$$p" -c '$(PY_MINOR)' 2>/dev/null); \
	case " $(PY_SUPPORTED) " in (*" $$v "*) command -v "$$p"; break;; esac; done)
PY_NEEDS := multisnacks needs Python 3.11, 3.12 or 3.13
PY_NONE := (python3.13, python3.12 or python3.11 on PATH); found none. Install one, or run make PYTHON=/path/to/python
PY_OTHER := . Run make PYTHON=/path/to/python3.13 (or 3.12, 3.11)
# $(call make_venv,python): the command that makes the venv with it, or one line of error if it will not do.
make_venv = $(call make_venv_with,$(1),$(if $(1),$(shell $(1) -c '$(PY_MINOR)' 2>/dev/null)))
make_venv_with = $(if $(1),$(if $(filter $(PY_SUPPORTED),$(2)),,$(error $(PY_NEEDS); PYTHON=$(1) is \
	$(if $(2),Python $(2),not a Python that runs)$(PY_OTHER))),$(error $(PY_NEEDS) $(PY_NONE)))$(1) -m venv $(VENV)
VENV := .venv
STAMP := $(VENV)/.installed
# The package's extras installed with it; CI adds `cluster` (Ray Train) so that its test runs too.
EXTRAS ?= test
CONFIG ?= configs/multisnacks.yaml
# In this workplace the dataset and the ImageNet weights sit in ../shared; elsewhere pass DATA=... or let
# the pipeline download them (see README).
DATA ?= $(wildcard ../shared/data/snacks)
WEIGHTS_DIR ?= $(wildcard ../shared/keras/models)
RUN = $(VENV)/bin/python -m pipeline --config $(CONFIG) $(if $(DATA),--data "$(DATA)") \
      $(if $(WEIGHTS_DIR),--weights-dir "$(WEIGHTS_DIR)")
STAGES := ingest augment train-head finetune evaluate export

.PHONY: all test status clean install check-platforms report-screenshot $(STAGES)

all: $(STAMP)
	$(RUN) all

$(STAGES) status: $(STAMP)
	$(RUN) $@

# One worker per core (at most 4), each taking whole test modules, so that a module's fixtures are built once.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n auto --maxprocesses 4 --dist loadscope

install: $(STAMP)

# Open artifacts/evaluate/report.html in headless Chromium and check the screenshot (report.png beside it).
report-screenshot: $(STAMP)
	$(VENV)/bin/python tools/screenshot_report.py artifacts/evaluate/report.html

# Resolve the pinned dependencies for macOS arm64 and Linux x86_64 on each supported Python (needs the registry).
check-platforms: $(STAMP)
	$(VENV)/bin/python tools/check_platforms.py

$(STAMP): pyproject.toml
	$(if $(wildcard $(VENV)/bin/python),,$(call make_venv,$(PYTHON)))
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

clean:
	rm -rf artifacts
