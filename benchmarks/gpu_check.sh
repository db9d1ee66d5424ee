#!/usr/bin/env bash
# GPU smoke and fidelity check on one CUDA GPU (issues 6 and 8). Reproduce:
#   OUT=/tmp/gpu-out bash benchmarks/gpu_check.sh
# 1. the gpu-marked tests (p=1 on CUDA against the single-device CUDA reference);
# 2. p=2 with both ranks on the one GPU over NCCL (NCCL may refuse two ranks on one device);
# 3. calibrate gpt2 on the GPU, plan p=1 x d=1, run it and compare simulated vs measured step time,
#    next to the uncalibrated (datasheet roofline) prediction.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
STEPS=${STEPS:-30}
PARTS=${PARTS:-123}  # which of the three checks to run
W=$(mktemp -d)
echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), 'gpus', torch.cuda.device_count())"

if [[ $PARTS == *1* ]]; then
echo "== 1. gpu tests"
timeout 300 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15

fi
if [[ $PARTS == *2* ]]; then
echo "== 2. p=2 on one GPU (NCCL)"
$PY -c "from pipetrain.executor.plans import simple_plan; simple_plan('tiny-gpt', pp=2, m=4, mbs=4, seq_len=64, device='cuda').save('$W/p2.json')"
timeout 150 $PY -m pipetrain.cli run "$W/p2.json" --run-dir "$W/p2" --steps 10 --dataset stdlib-text --timeout 60 > "$OUT/p2.log" 2>&1
echo "exit $?"; grep -v "^\s*$" "$OUT/p2.log" | grep -iE "error|duplicate|loss|step|warning" | head -12

fi
if [[ $PARTS == *3* ]]; then
echo "== 3. p=1 d=1: calibrate, plan, run"
TOPO=${TOPO:-dgx-h100:1}; MODEL=${MODEL:-gpt2}; GB=${GB:-32}; MBS=${MBS:-8}; M=${M:-4}; SEQ=${SEQ:-1024}
timeout 300 $PY -m pipetrain.cli calibrate --topology $TOPO --model $MODEL --microbatch-sizes $((MBS / 2)),$MBS --dtype bf16 --seq-len $SEQ \
  --no-probe -o "$OUT/calibration.json" 2>&1 | tail -14
JOB="--model $MODEL --topology $TOPO --pp 1 --dp 1 --global-batch $GB --microbatch-size $MBS --microbatches $M --seq-len $SEQ --dtype bf16 --no-pin-cost"
$PY -m pipetrain.cli plan $JOB -o "$W/gpt2-analytic.json" 2>&1 | grep -E "predicted"
CAL=""; [ -s "$OUT/calibration.json" ] && CAL="--calibration $OUT/calibration.json"
$PY -m pipetrain.cli plan $JOB $CAL -o "$OUT/gpt2-plan.json" 2>&1 | grep -E "predicted|stage|error"
timeout 240 $PY -m pipetrain.cli run "$OUT/gpt2-plan.json" --steps $STEPS --run-dir "$W/gpt2" $CAL 2>&1 | tail -25
cp "$W/gpt2/fidelity.json" "$W/gpt2/result.json" "$OUT/" 2>/dev/null
$PY - "$W/gpt2" "$W/gpt2-analytic.json" <<'EOF'
import json, statistics, sys
from pathlib import Path
run, analytic = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
res = json.loads((run / "result.json").read_text())
plan = json.loads((run / "plan.json").read_text())
times = res["step_times_s"][3:]  # after warm-up
med = statistics.median(times)
cal_pred, ana_pred = plan["predicted"]["step_time_s"], analytic["predicted"]["step_time_s"]
print(f"measured median step {med * 1e3:.2f} ms over {len(times)} steps (p10 {sorted(times)[len(times) // 10] * 1e3:.2f} ms)")
print(f"calibrated simulation {cal_pred * 1e3:.2f} ms: error {100 * (cal_pred / med - 1):+.1f}%")
print(f"analytic (datasheet) simulation {ana_pred * 1e3:.2f} ms: error {100 * (ana_pred / med - 1):+.1f}%")
print(f"losses first/last {res['losses'][0]:.4f} / {res['losses'][-1]:.4f}")
EOF
fi
rm -rf "$W"
