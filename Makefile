# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Rules call the `brainfoundry` console script, so the venv's bin must lead PATH.
RUN := PATH=$(abspath $(BIN)):$$PATH
# The CPU wheel; a bare `torch` would pull a multi-GB CUDA build on machines without a GPU.
TORCH_SPEC ?= torch==2.13.0
CORES ?= 2

.PHONY: demo abide test venv lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]" "$(TORCH_SPEC)"
	touch $@

venv: $(BIN)/.installed

demo: venv
	test -f demo_data/derivatives/fmriprep/dataset_description.json || $(BIN)/brainfoundry demo-data demo_data
	$(RUN) $(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml
	$(RUN) $(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml --report results/report.html
	@echo "Report: results/report.html"

# The full ABIDE run on ../shared/data (see config/abide.yaml): pretraining, evaluation, report, wall time by step.
abide: venv
	$(RUN) $(BIN)/snakemake --cores $(CORES) --configfile config/abide.yaml
	$(RUN) $(BIN)/snakemake --cores $(CORES) --configfile config/abide.yaml --report results/abide/report.html
	$(RUN) $(BIN)/brainfoundry walltime results/abide/benchmarks --out results/abide/walltime.tsv
	@echo "Report: results/abide/report.html"

test: venv
	$(RUN) $(BIN)/python -m pytest tests

lint: venv
	$(RUN) $(BIN)/snakemake --lint --configfile config/config.yaml

clean:
	rm -rf results .snakemake demo_data
