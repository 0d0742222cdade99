# vaebench: `make sweep` then `make test` is all a newcomer types (both work offline).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SPEC   ?= experiments/default.toml
RESULTS ?= results
WORKERS ?= 2
HOST   ?= 127.0.0.1
PORT   ?= 5000
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install sweep test test-fast report paper perf mutate ui-check reproduce services services-stop ui dashboard clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test,peers]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project with its test extras (idempotent)

sweep: $(STAMP)  ## run a study (SPEC=experiments/default.toml, WORKERS=2) and print the comparison
	$(BIN)/bench sweep $(SPEC) --workers $(WORKERS) --results $(RESULTS)

test: $(STAMP)  ## run the whole test suite (slow tests included)
	@$(BIN)/python -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; exit 1; fi; \
	exit $$status

test-fast: $(STAMP)  ## the test suite without tests marked slow
	$(BIN)/python -m pytest -q -m "not slow"

report: $(STAMP)  ## write the report of the last study to results/reports/
	$(BIN)/bench report --results $(RESULTS)

paper: $(STAMP)  ## run the paper tables (CPU budget) and print them beside the published numbers
	$(BIN)/bench table all --results $(RESULTS)

perf: $(STAMP)  ## measure training speed against baselines (writes results/perf.json)
	$(BIN)/bench perf --out $(RESULTS)/perf.json

ui-check: $(STAMP)  ## drive the MLflow UI in headless chromium: pictures and step sliders (not in CI)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[ui]"
	@test -x /usr/bin/chromium || { echo "ui-check needs Debian's chromium: apt-get install chromium"; exit 2; }
	$(BIN)/python tests/ui_check.py

mutate: $(STAMP)  ## mutation testing of the modules that decide the numbers (slow; not in CI)
	$(BIN)/pip install --quiet --disable-pip-version-check "mutmut>=3.8,<4"
	$(BIN)/python tests/mutate.py $(MODULES)

reproduce: $(STAMP)  ## the Exemplar VAE reproduction at the paper's protocol, in the background (resumes)
	nohup $(BIN)/bench table exemplar2020 --full --workers 3 --results $(RESULTS) \
		--publish docs/reproductions/exemplar2020 \
		>> $(RESULTS)/reproduce-exemplar2020.log 2>&1 &
	@echo "training in the background; progress: tail -f $(RESULTS)/reproduce-exemplar2020.log"

services: $(STAMP)  ## start a local PostgreSQL + MLflow server on 127.0.0.1 and print their URLs
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test,scale]"
	$(BIN)/bench services start --results $(RESULTS)

services-stop: $(STAMP)  ## stop exactly the services `make services` started
	$(BIN)/bench services stop --results $(RESULTS)

ui: $(STAMP)  ## browse the runs: mlflow ui on the study's store (127.0.0.1:5000 by default)
	$(BIN)/bench ui --results $(RESULTS) --host $(HOST) --port $(PORT)

dashboard: $(STAMP)  ## optuna-dashboard on the study's storage, if installed
	$(BIN)/bench dashboard --results $(RESULTS) --host $(HOST) --port 8080

clean:  ## delete generated results (keeps results/README.md) and the virtualenv
	find $(RESULTS) -mindepth 1 ! -name README.md -exec rm -rf {} +
	rm -rf $(VENV)
