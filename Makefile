# Thin aliases over `python -m pipeline`. `make all` / `make test` create the virtual environment first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed
CONFIG ?= configs/multisnacks.yaml
# In this workplace the dataset and the ImageNet weights sit in ../shared; elsewhere pass DATA=... or let
# the pipeline download them (see README).
DATA ?= $(wildcard ../shared/data/snacks)
WEIGHTS_DIR ?= $(wildcard ../shared/keras/models)
RUN = $(VENV)/bin/python -m pipeline --config $(CONFIG) $(if $(DATA),--data "$(DATA)") \
      $(if $(WEIGHTS_DIR),--weights-dir "$(WEIGHTS_DIR)")
STAGES := ingest augment train-head finetune evaluate export

.PHONY: all test status clean install $(STAGES)

all: $(STAMP)
	$(RUN) all

$(STAGES) status: $(STAMP)
	$(RUN) $@

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf artifacts
