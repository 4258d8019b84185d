#!/bin/sh
# GPU worker start: compile ModelOpt's CUDA extensions for this host's GPU before taking work (they cannot be built
# at image build time, which has no GPU; TORCH_EXTENSIONS_DIR is a per-host volume, so a restart loads them at once),
# then run the given command (the Prefect worker). A failed warm-up is reported, not fatal: the first quantize
# stage then compiles them and says so.
enginewright warmup || echo "gpu-worker: enginewright warmup failed; the first quantize stage will compile ModelOpt's extensions" >&2
exec "$@"
