# Two commands from a fresh clone: `make run` (app on the bundled model) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8501

.PHONY: setup run test test-fast bench bench-resume export clean

$(BIN)/activate: requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(BIN)/activate

setup: $(BIN)/activate

run: setup
	$(BIN)/python -m streamlit run app.py --server.port $(PORT)

test: setup
	$(BIN)/python -m pytest -q --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not e2e"

bench: setup
	$(BIN)/python bench/run_all.py

# Continue an interrupted `make bench` at the same commit (a full run outlasts a working session here).
bench-resume: setup
	$(BIN)/python bench/run_all.py --resume

# Re-export every bundled model for screening without TensorFlow (after retraining one).
export: setup
	for m in models/*/model_card.json; do $(BIN)/python -m bcc_core export --model $$(dirname $$m) || exit 1; done

clean:
	rm -rf .cache .pytest_cache
