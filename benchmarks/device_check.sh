#!/usr/bin/env bash
# One prepared check for an accelerator machine (issue 29), under 8 minutes.
#
#   bash benchmarks/device_check.sh              # on the GPU machine, from the repository root
#   bash benchmarks/device_check.sh --cpu --quick  # the CPU dry run (tiny sizes)
#   ... --only layers,lm                            # some of the stages (layers, lm, translate)
#
# 1. A virtualenv: .venv if present, else `make venv`. With a GPU
#    (`nvidia-smi` present) and a TensorFlow that sees none, it installs
#    tensorflow[and-cuda]==2.21.* into it (skipped by --cpu). A failed
#    install is reported and the check goes on with the devices TF sees.
# 2. benchmarks/device_layers.py: the MoE layer at d=512, h=1024,
#    E in {32, 256, 2048}, dropless and capacity, float32 and bfloat16.
# 3. benchmarks/lm_throughput.py and benchmarks/translate_throughput.py:
#    training tokens/s at the paper's widths (moe-32 vs 4xlstm-512,
#    gnmt-moe-32 vs gnmt-baseline), 20 steps per timed fit.
# Each stage has its own time limit (200, 100, 120 s; the install 120 s),
# cut so that the whole check ends within DEVICE_CHECK_BUDGET_S (470 s); a
# stage that fails or runs out is recorded as such in summary.json (the
# layer stage writes its JSON after every case) and the others still run. JSON goes to
# $OUT if set, else benchmarks/results/device/; a table with the device's
# name is printed at the end.
set -uo pipefail
cd "$(dirname "$0")/.."

CPU=0
QUICK=0
ONLY="layers,lm,translate"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1 ;;
    --quick) QUICK=1 ;;
    --only) shift; ONLY="${1:-}" ;;
    *) echo "device_check.sh: unknown argument $1 (use --cpu, --quick, --only STAGES)" >&2
       exit 2 ;;
  esac
  shift
done
for stage in ${ONLY//,/ }; do
  case "$stage" in
    layers|lm|translate) ;;
    *) echo "device_check.sh: unknown stage '$stage' in --only (layers, lm, translate)" >&2
       exit 2 ;;
  esac
done
OUTDIR="${OUT:-benchmarks/results/device}"
mkdir -p "$OUTDIR"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
START=$(date +%s)
BUDGET="${DEVICE_CHECK_BUDGET_S:-470}"  # seconds for the whole check, install included

if [ ! -x .venv/bin/python ]; then
  make venv || { echo "device_check.sh: make venv failed" >&2; exit 1; }
fi
PY=.venv/bin/python

if [ "$CPU" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""
  echo "install step: skipped (--cpu)"
elif command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  if ! "$PY" -c "import sys, tensorflow as tf; sys.exit(0 if tf.config.list_physical_devices('GPU') else 1)" 2>/dev/null; then
    echo "install step: TensorFlow sees no GPU; installing tensorflow[and-cuda]==2.21.*"
    timeout 120 "$PY" -m pip install --quiet "tensorflow[and-cuda]==2.21.*" \
      || echo "install step: FAILED (going on with the devices TensorFlow sees)"
  else
    echo "install step: not needed (TensorFlow sees the GPU)"
  fi
else
  echo "install step: skipped (no nvidia-smi)"
fi

if [ "$QUICK" = 1 ]; then
  LAYER_ARGS=(--quick --repeats 1)
  LM_ARGS=(--quick --repeats 1 --pairs cpu-moe-32:cpu-dense)
  MT_ARGS=(--quick --repeats 1 --pairs cpu-gnmt-moe-16:cpu-gnmt-dense --decode-sentences 4
           --beam-width 1)
  LIMITS=(120 120 120)
else
  LAYER_ARGS=(--repeats 3)
  LM_ARGS=(--pairs moe-32:4xlstm-512 --steps 20 --repeats 1 --batch-size 64 --seq-len 35)
  MT_ARGS=(--pairs gnmt-moe-32:gnmt-baseline --steps 20 --repeats 1 --batch-size 64
           --decode-sentences 64)
  LIMITS=(200 100 120)
fi

STAGES=(layers lm translate)
SCRIPTS=(benchmarks/device_layers.py benchmarks/lm_throughput.py benchmarks/translate_throughput.py)
STATUS=()
for i in 0 1 2; do
  stage=${STAGES[$i]}
  [[ ",$ONLY," == *",$stage,"* ]] || continue
  rm -f "$OUTDIR/$stage.json"  # no stale results from an earlier run
  case $stage in
    layers) args=("${LAYER_ARGS[@]}") ;;
    lm) args=("${LM_ARGS[@]}") ;;
    translate) args=("${MT_ARGS[@]}") ;;
  esac
  # Never past the whole check's budget (8 minutes, less a margin for the summary).
  left=$(( BUDGET - ($(date +%s) - START) - 15 ))
  limit=${LIMITS[$i]}
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 0 ]; then
    STATUS+=("$stage:124:0"); echo "== $stage: skipped (budget spent)"; continue
  fi
  echo "== $stage (limit $limit s)"
  t0=$(date +%s)
  timeout "$limit" "$PY" "${SCRIPTS[$i]}" "${args[@]}" --out "$OUTDIR/$stage.json"
  rc=$?
  STATUS+=("$stage:$rc:$(( $(date +%s) - t0 ))")
done

"$PY" - "$OUTDIR" "$(( $(date +%s) - START ))" "$QUICK" "${STATUS[@]}" <<'PYEOF'
import json, os, sys

import tensorflow as tf

out, total, quick, statuses = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]
gpus = tf.config.list_physical_devices("GPU")
device = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") \
    if gpus else "CPU"
stages = {}
for entry in statuses:
    name, rc, seconds = entry.split(":")
    path = os.path.join(out, f"{name}.json")
    stages[name] = dict(rc=int(rc), seconds=int(seconds), timed_out=rc in ("124", "137"),
                        json=path if os.path.exists(path) else None)
summary = dict(device=device, quick=quick, tensorflow=tf.__version__, total_seconds=total,
               stages=stages)
print(f"\ndevice check on {device} (TensorFlow {tf.__version__}), {total} s in all")
print(f"{'stage':10} {'status':>10} {'seconds':>8}")
for name, s in stages.items():
    status = "ok" if s["rc"] == 0 else ("timed out" if s["timed_out"] else f"rc {s['rc']}")
    print(f"{name:10} {status:>10} {s['seconds']:>8}")
if stages.get("layers", {}).get("json"):
    rows = json.load(open(stages["layers"]["json"]))["rows"]
    print(f"\n{'E':>5} {'dispatch':13} {'precision':9} {'f+b s':>8} {'ideal s':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['num_experts']:>5} {r['dispatch']:13} {r['precision']:9} "
              f"{r['forward_backward_s']:8.4f} {r['ideal_forward_backward_s']:8.4f} "
              f"{r['ratio']:6.2f}")
for name in ("lm", "translate"):
    if stages.get(name, {}).get("json"):
        for row in json.load(open(stages[name]["json"]))["rows"]:
            for role in ("moe", "dense"):
                # lm_throughput says tokens_per_second; translate_throughput
                # train_tokens_per_second (it also times decoding).
                rate = row[role].get("tokens_per_second", row[role].get("train_tokens_per_second"))
                print(f"{name:10} {row[role]['preset']:16} {rate:10.0f} training tokens/s")
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
print(f"wrote {os.path.join(out, 'summary.json')}")
sys.exit(0 if all(s["rc"] == 0 for s in stages.values()) else 1)
PYEOF
