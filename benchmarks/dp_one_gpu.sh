#!/usr/bin/env bash
# The data-parallel path (accelerate MULTI_GPU config, the one kaggle-2xt4 uses for LoRA) on one GPU with the
# fast rollout engine; see benchmarks/dp_one_gpu.py. Run from the repository root:
#   bash benchmarks/dp_one_gpu.sh [OUT_DIR] [key=value ...]     e.g. ... /tmp/dp dtype=fp16
# Needs torch (CUDA), transformers, trl, peft, accelerate and this repo's requirements; no network.
set -euo pipefail
OUT=${1:-/tmp/chartrl-dp-one-gpu}; shift || true
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -m accelerate.commands.launch --config_file nbhelpers/launch_configs/multi-gpu.yaml --num_processes 1 \
  benchmarks/dp_one_gpu.py "$OUT" "$@" 2>&1 | tee "$OUT/dp_one_gpu.log"
