#!/usr/bin/env bash
# The vllm backend on a borrowed H200, in the calls one lease allows (state lives in /tmp between calls).
#   bash benchmarks/gpu/h200_vllm_session.sh setup        # after the wheel pieces are assembled in /tmp/ship
#   bash benchmarks/gpu/h200_vllm_session.sh run-8b-fp8   # an 8B-shaped Llama (random bf16): speed, bf16 and fp8
#   bash benchmarks/gpu/h200_vllm_session.sh run-8b       # the same, nvfp4 added (bf16 and fp8 cached)
#   bash benchmarks/gpu/h200_vllm_session.sh run-small    # a small Llama trained here: accuracy that means something
#   bash benchmarks/gpu/h200_vllm_session.sh serve-check  # resolve --download --verify, then vLLM serves the champion
# Results go to $OUT (the device tool brings them back) and to /tmp/results.
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/results} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=/tmp/site ENGINEWRIGHT_HOME=/tmp/ewhome ENGINEWRIGHT_VLLM_PYTHON=/tmp/vllm-python
mkdir -p "$OUT" /tmp/results
case "${1:?step}" in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/vllm /tmp/ship/vllm/*.whl
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      /tmp/ship/site/*.whl
    printf '#!/bin/sh\nexport PYTHONPATH=/tmp/vllm:/tmp/vllm/nvidia_cutlass_dsl/dsl_packages PATH=/tmp/vllm/bin:$PATH VLLM_USE_FLASHINFER_SAMPLER=0\nexec python3 "$@"\n' \
      > /tmp/vllm-python && chmod +x /tmp/vllm-python
    /tmp/vllm-python -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    # ModelOpt's CUDA extensions compile on the CPU while the models are made on the GPU
    (python3 -m flows.cli warmup > /tmp/results/warmup.log 2>&1; echo "warmup exit $?" >> /tmp/results/warmup.log) &
    python3 benchmarks/gpu/vllm_certify.py make-models --out /tmp/models --small-hidden 1536 --small-layers 8 \
      --out-file "$OUT/models.json" 2>&1 | tail -20
    wait; tail -3 /tmp/results/warmup.log
    ;;
  run-8b-fp8)  # bf16 and fp8 (the run after it adds nvfp4; bf16 and fp8 are then cache hits)
    python3 benchmarks/gpu/vllm_certify.py run --model /tmp/models/llama-8b --name llama-8b \
      --set 'quantization.formats=[fp8]' --set evaluation.limit=50 --set latency.requests=64 \
      --out-file "$OUT/h200-vllm-8b-fp8.json" 2>&1 | tail -60
    ;;
  run-8b)
    python3 benchmarks/gpu/vllm_certify.py run --model /tmp/models/llama-8b --name llama-8b \
      --set evaluation.limit=50 --set latency.requests=64 --out-file "$OUT/h200-vllm-8b.json" 2>&1 | tail -60
    ;;
  run-small)
    python3 benchmarks/gpu/vllm_certify.py run --model /tmp/models/small --name llama-small \
      --set latency.requests=64 --out-file "$OUT/h200-vllm-small.json" 2>&1 | tail -60
    ;;
  serve-check)
    python3 benchmarks/gpu/vllm_certify.py serve-check --registered "${2:-llama-small}-vllm" --dest /tmp/downloaded \
      --out-file "$OUT/h200-vllm-serve-check.json" 2>&1 | tail -30
    ;;
esac
cp -f "$OUT"/*.json /tmp/results/ 2>/dev/null || true
