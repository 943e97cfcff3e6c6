# vitkit: `make pipeline` runs the whole DAG, `make test` runs the tests.
# Both create the virtual environment (.venv) from constraints.txt first if needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin

# stage commands in dvc.yaml call `python`: make it the project's
export PATH := $(BIN):$(PATH)
# keep tool state inside the project and quiet offline
export PREFECT_HOME := $(abspath .prefect)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: install pipeline test test-slow lint gpu-check mlflow-ui prefect-ui serve bench clean-state

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]' \
		2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/python -c "import torch, torchvision, vitkit"
	touch $@

install: $(VENV)/.installed

## The main job: validate params, then run every stage through the Prefect flow (which runs DVC).
pipeline: install
	$(BIN)/python -m vitkit.config check params.yaml
	$(BIN)/python -m flows.pipeline
	$(BIN)/python -m flows.summary

## The test suite (about 15 minutes on 2 cores); slow tests are excluded.
test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

## On a CUDA machine: each model stage's training step with bf16 + torch.compile + TF32 at the gpu
## profile's sizes; prints steps/s, peak memory and MFU per model (a few minutes, mostly compilation).
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py

mlflow-ui: install
	MLFLOW_TRACKING_URI=sqlite:///$(abspath mlflow.db) $(BIN)/python -m vitkit.tracking url
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --port 5000

prefect-ui: install
	$(BIN)/prefect server start

serve: install
	$(BIN)/python -m flows.pipeline --serve
