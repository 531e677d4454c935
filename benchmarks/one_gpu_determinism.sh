#!/usr/bin/env bash
# One GPU: the fast rollout engine under full_determinism, the same 3-step run twice (the smoke preset: tiny-pretrained, bf16);
# prints whether the two final adapters are bitwise equal. Usage: bash benchmarks/one_gpu_determinism.sh OUT_DIR
set -uo pipefail
OUT=${1:?output folder}
mkdir -p "$OUT"
for run in a b; do
  python3 -m nbhelpers train --params smoke --params nsr --set full_determinism=true --set rollout_engine=fast \
    --set dtype=bf16 --set max_steps=3 --set output_root="$OUT/$run" --set persistent_root=none \
    --set "report_to=[none]" > "$OUT/$run.log" 2>&1
  echo "run $run exit $?"
done
python3 - "$OUT" <<'PY'
import glob, sys
from safetensors.torch import load_file
out = sys.argv[1]
a, b = (load_file(glob.glob(f"{out}/{run}/*/final/adapter_model.safetensors")[0]) for run in "ab")
print("fast engine + full_determinism: bitwise", all(bool((a[k] == b[k]).all()) for k in a),
      "| lora_B tensors moved from zero:", sum(bool(t.any()) for k, t in a.items() if "lora_B" in k),
      "of", sum("lora_B" in k for k in a))
PY
