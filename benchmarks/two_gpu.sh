#!/usr/bin/env bash
# Two GPUs, DeepSpeed ZeRO-3 through accelerate, on the real 3B architecture with random weights:
# every mode for a few steps (s/step and peak memory per GPU from the logs), the fp16 (T4) path, and a
# kill-and-resume check against uninterrupted runs. Usage: bash benchmarks/two_gpu.sh OUT_DIR [part]
# part: modes | resume (with full_determinism) | noise (the same without it) | full (full fine-tuning,
# tiny-random) | all (default).
# Needs 2 GPUs, deepspeed, and this repo's requirements.
set -uo pipefail
OUT=${1:?output folder}; PART=${2:-all}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
LAUNCH=(python3 -m accelerate.commands.launch --config_file nbhelpers/launch_configs/zero3-2gpu.yaml -m nbhelpers train)
COMMON=(--params smoke --set vlm_name=qwen2-5-3b-random --set max_completion_length=64 --set batch_size=2
        --set num_generations=2 --set gradient_accumulation_steps=1 --set save_steps=1 --set save_total_limit=2
        --set max_pixels=250880 --set persistent_root=none --set rollout_engine=stock --set learning_rate=1e-5
        --set gradient_checkpointing=true --set subset_size=8 --set deepspeed=zero3 --set num_processes=2
        --set "report_to=[none]")

python3 - <<'PY'
import torch, transformers, trl, peft, accelerate, deepspeed
print("versions", torch.__version__, transformers.__version__, trl.__version__, peft.__version__,
      accelerate.__version__, deepspeed.__version__, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
PY

if [ "$PART" = modes ] || [ "$PART" = all ]; then
  for mode in grpo psr nsr w-reinforce; do
    "${LAUNCH[@]}" --params "$mode" "${COMMON[@]}" --set dtype=bf16 --set max_steps=2 \
      --set output_root="$OUT/runs-bf16" > "$OUT/$mode-bf16.log" 2>&1
    echo "mode $mode bf16 exit $?"; grep -E "peak GPU memory|s/step" "$OUT/$mode-bf16.log" | tail -3
  done
  "${LAUNCH[@]}" --params nsr "${COMMON[@]}" --set dtype=fp16 --set max_steps=2 \
    --set output_root="$OUT/runs-fp16" > "$OUT/nsr-fp16.log" 2>&1
  echo "mode nsr fp16 exit $?"; grep -E "peak GPU memory|s/step" "$OUT/nsr-fp16.log" | tail -3
fi

# Two uninterrupted runs (a, b) and one SIGKILLed right after checkpoint-1 then restarted (killed), all
# with the given extra settings; prints the final steps and the largest weight difference of b and killed
# against a.
rerun_check() {
  local dir="$OUT/$1"; shift
  local ARGS=(--params nsr "${COMMON[@]}" --set dtype=bf16 --set max_steps=3 "$@")
  for run in a b; do
    "${LAUNCH[@]}" "${ARGS[@]}" --set output_root="$dir/$run" > "$dir-$run.log" 2>&1; echo "$(date +%T) run $run exit $?"
  done
  "${LAUNCH[@]}" "${ARGS[@]}" --set output_root="$dir/killed" > "$dir-killed-1.log" 2>&1 &
  local pid=$!
  until ls "$dir"/killed/*/checkpoint-1/chartrl-manifest.json >/dev/null 2>&1 || ! kill -0 $pid 2>/dev/null; do sleep 1; done
  pkill -9 -f "nbhelpers train" ; kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null; echo "$(date +%T) killed after checkpoint-1"
  sleep 3
  "${LAUNCH[@]}" "${ARGS[@]}" --set output_root="$dir/killed" > "$dir-killed-2.log" 2>&1; echo "$(date +%T) resumed exit $?"
  grep -h "Resuming from" "$dir-killed-2.log"
  python3 - "$dir" <<'PY'
import glob, json, sys
from safetensors.torch import load_file
root = sys.argv[1]
def final(run):  # adapter_model.safetensors (LoRA) or model*.safetensors (full fine-tuning)
    tensors = {}
    for path in sorted(glob.glob(f"{root}/{run}/*/final/*.safetensors")):
        tensors.update(load_file(path))
    return tensors
def step(run):
    return json.load(open(glob.glob(f"{root}/{run}/*/trainer_state.json")[0]))["global_step"]
a = final("a")
if any("lora_B" in k for k in a):  # LoRA B starts at zero
    moved, total = sum(bool(t.any()) for k, t in a.items() if "lora_B" in k), sum("lora_B" in k for k in a)
else:  # the saved full model loads, and differs from the initial one
    from nbhelpers.models import build_random_model, load_model
    saved_dtype = next(iter(a.values())).dtype
    loaded = load_model(glob.glob(f"{root}/a/*/final")[0]).state_dict()
    start = build_random_model("tiny-random").state_dict()
    assert loaded.keys() == start.keys() and all(loaded[k].shape == start[k].shape for k in start)
    moved, total = sum(not bool((loaded[k] == start[k].to(saved_dtype).float()).all()) for k in start), len(start)
print(f"a: {len(a)} tensors saved, {sum(t.numel() for t in a.values()):,} values, "
      f"{sum(t.numel() == 0 for t in a.values())} empty (an empty one would be a ZeRO-3 partition), "
      f"{moved} of {total} trained tensors changed by training")
for run in ("b", "killed"):
    other = final(run)
    diff = max(float((a[k].float() - other[k].float()).abs().max()) for k in a)
    print(f"{run} vs a: steps {step(run)} vs {step('a')}, same keys {a.keys() == other.keys()}, "
          f"max abs diff {diff:.3g}, bitwise {all(bool((a[k] == other[k]).all()) for k in a)}")
PY
}

if [ "$PART" = resume ] || [ "$PART" = all ]; then
  rerun_check deterministic --set full_determinism=true
fi
if [ "$PART" = noise ] || [ "$PART" = all ]; then
  rerun_check default
fi
if [ "$PART" = full ] || [ "$PART" = all ]; then  # full fine-tuning: the gathered 16-bit weights, on tiny-random
  rerun_check full --set full_determinism=true --set finetune=full --set vlm_name=tiny-random --set max_pixels=3136 \
    --set learning_rate=1e-4
fi
