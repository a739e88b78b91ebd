#!/usr/bin/env bash
# Every check a machine with a GPU (or TPU) should run, in one call, from the repository root:
#   1. our MixSKD and plain CE steps in bfloat16: step time, FLOPs, peak memory and the
#      fraction of the datasheet's dense bf16 peak (MFU) on known accelerators;
#   2. the same steps side by side with PyTorch's (float32; PyTorch on the GPU when its build
#      has CUDA), if PyTorch is installed;
#   3. the 8-device check: the sharded MixSKD step compiled for 8 devices (the real ones where
#      there are 8, else 8 fake CPU devices) moves no activations, read from its HLO.
# Usage: experiments/device_check.sh [OUT_DIR]   (default /tmp/mixskd_device_check)
# Environment: CONFIG (configs/cifar100_resnet18_mixskd.py), BATCH (128), STEPS (10),
# ROUNDS (3), SKIP_TORCH=1 to leave out step 2. It also runs on a CPU, smaller (the tests do).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/mixskd_device_check}
CONFIG=${CONFIG:-configs/cifar100_resnet18_mixskd.py}
BATCH=${BATCH:-128}
STEPS=${STEPS:-10}
ROUNDS=${ROUNDS:-3}
mkdir -p "$OUT"
bench() { python3 -m mixskd_jax.benchmark --config="$CONFIG" --config.batch_size="$BATCH" "$@"; }

echo "== 1. our steps in bfloat16"
bench --config.model.dtype=bfloat16 --steps="$STEPS" --skip_pipeline \
  --json_out="$OUT/bf16.json" | tee "$OUT/bf16.txt"

echo "== 2. side by side with PyTorch (float32)"
if [[ "${SKIP_TORCH:-0}" == "1" ]]; then
  echo "skipped (SKIP_TORCH=1)" | tee "$OUT/side_by_side.txt"
elif python3 -c "import torch" 2>/dev/null; then
  bench --against=torch --rounds="$ROUNDS" --steps="$STEPS" \
    --json_out="$OUT/side_by_side.json" | tee "$OUT/side_by_side.txt"
else
  echo "skipped: PyTorch is not installed (pip install torch)" | tee "$OUT/side_by_side.txt"
fi

echo "== 3. 8 devices: what the sharded step sends between devices"
if [[ "$(python3 -c 'import jax; print(jax.device_count())')" -ge 8 ]]; then
  devices=()
else
  devices=(env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8)
fi
${devices[@]+"${devices[@]}"} python3 -m mixskd_jax.benchmark --config="$CONFIG" --steps=0 --skip_ce \
  --skip_pipeline --json_out="$OUT/communication_8.json" > "$OUT/communication_8.txt"
python3 - "$OUT/communication_8.json" <<'EOF' | tee "$OUT/communication_8_check.txt"
import json, sys
from mixskd_jax.bench import collectives
step = json.load(open(sys.argv[1]))["step"]
check = collectives.activation_check(step["communication"], step["parameter_bytes"])
print(f"{step['devices']} devices, {step['mix_groups']} mix groups: largest data-moving "
      f"collective {check['largest_data_moving_bytes']} bytes, all-reduce "
      f"{check['all_reduce_bytes']} bytes for {check['parameter_bytes']} parameter bytes: "
      + ("MOVES ACTIVATIONS" if check["moves_activations"] else "no activations move"))
sys.exit(1 if check["moves_activations"] else 0)
EOF
echo "wrote $OUT"
