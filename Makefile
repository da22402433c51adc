# Set-up and everyday commands. Every target creates the virtual environment first if needed.
#   make example   train the default example (2 stages on CPU, a couple of minutes with set-up)
#   make test      run the test suite (unit, in-process pipeline, real multi-process RPC runs)

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: venv example test lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

example: venv
	$(BIN)/python -m pipetrain.train

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check pipetrain tests scripts

clean:
	rm -rf $(VENV) runs multirun outputs .pytest_cache
