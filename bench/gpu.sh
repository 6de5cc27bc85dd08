#!/usr/bin/env bash
# The device check (bench/gpu.py): estimated at about 8 minutes on one large NVIDIA GPU, not yet measured
# whole (--budget-s and --resume split it over commands); `--cpu-smoke`: toy sizes on a CPU.
#
#   bash bench/gpu.sh [--cpu-smoke] [--parts profile,train,dp,compare,data,reads,launch,layout] [--budget-s 500]
#                     [--resume] [--out DIR]
#
# Writes gpu.json and gpu.md (the figures against their goals) after every part, so a run killed from outside keeps
# the parts it finished; --budget-s bounds the whole run (each part stops at what is left); --resume keeps the parts
# an earlier run in --out finished and runs the rest; with $OUT set, every write lands there too. The profile part
# also writes gpu_profile.md and gpu_profile.csv: per mode (eager, compiled) wall and host ms per step, the GPU's
# idle fraction, kernels per step, the attention backend, time by category (lm head + cross-entropy, attention,
# casts, block matmuls, ...) and the top kernels, then the chunked lm head + cross-entropy against the
# float32-logits path (time and peak memory, chunked / plain). docs/benchmarks.md "Reading the profile part" says
# how to read them. The data part: the fraction of step time goldenpath train waits for data, batches made in the
# step vs made ahead (data.prefetch), for the teacher CNN, CIFAR-5m npz parts and GPT-2 on C4-layout parquet text.
# The reads part: host reads per step (quiet and logged steps) of GPT-2 under goldenpath train, and on CUDA the
# synchronisations torch.cuda.set_sync_debug_mode counts, with a one-read-per-step control that both must see. The
# layout part: channels-last images against channels-first for the GPU study's CNN and ResNet-18 (non-private
# and DP-SGD steps), which decides whether a GPU runs them channels-last as a CPU does. The --cpu-smoke files are
# named gpu_cpu_smoke*.
#
# On a machine whose Python already has torch with CUDA, goldenpath is installed without touching torch
# (--no-deps); packages the machine lacks (opacus, datasets, submitit, ...) are taken from wheels in
# ./.whl when that folder exists (pip download them where a registry is reachable). Results go to --out
# (default: $OUT when it is set, else bench/results/) and to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
source bench/install.sh
exec "$PY" bench/gpu.py "$@"
