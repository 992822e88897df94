#!/usr/bin/env bash
# The CUDA paths in one go, for a machine with a GPU: training in bf16 and fp16 (GradScaler), resume, compile with
# channels-last, sampling (one process, one per GPU under torchrun, compiled with CUDA graphs: the same images?),
# the quality metric of a demo trained on the GPU, and benchmark.py at batch 128 and batch 1, plain and compiled.
# Each step has a time limit; a failed one is reported and the rest go on. Prints a table at the end.
#
#     bash tools/cuda_check.sh [OUT_DIR]     # logs and the table in OUT_DIR (default results/cuda_check)
#
# It writes the runs cuda-bf16, cuda-fp16, cuda-compile (and cuda-ddp on several GPUs) in checkpoints/ and results/,
# deletes nothing, and refuses to start where an earlier check left them (their steps would be resumed, not timed).
# QUICK=1 DEVICE=cpu tries the script itself on a CPU in a few minutes (tiny steps and batches, the demo model).
set -u
OUT_DIR=$(realpath -m "${1:-results/cuda_check}")
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
if [ -n "${QUICK:-}" ]; then
    N_TRAIN=40 N_RESUME=60 N_SHORT=20 N_SAMPLES=16 N_EVAL=40 BIG=4 BENCH_PRESET=demo
else
    N_TRAIN=1500 N_RESUME=1700 N_SHORT=300 N_SAMPLES=1024 N_EVAL=1000 BIG=128 BENCH_PRESET=ddpm-cifar10
fi
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/cuda_check.log"
TABLE="$OUT_DIR/table.md"
PY=${PYTHON:-python3}
for run in cuda-bf16 cuda-fp16 cuda-compile cuda-ddp; do
    if [ -e "checkpoints/$run" ]; then
        echo "error: checkpoints/$run exists (an earlier check): its steps would be resumed, not timed; move" \
             "checkpoints/cuda-* and results/logs/cuda-* away first" >&2
        exit 1
    fi
done
export PYTHONUNBUFFERED=1
: >"$LOG"
printf '| step | status | seconds | result |\n|---|---|---|---|\n' >"$TABLE"

# step NAME LIMIT_SECONDS COMMAND...: run it, keep its output in the log, add a row to the table (result: the
# last line of its output that matches $PICK, if set).
step() {
    local name=$1 limit=$2; shift 2
    echo "=== $name: $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout -k 30 "$limit" "$@" >"$OUT_DIR/step.out" 2>&1
    local rc=$? seconds=$((SECONDS - start))
    tr '\r' '\n' <"$OUT_DIR/step.out" | grep -v '^\s*$\|%|\|Warning\|warn(\|^W[0-9]\{4\} ' >>"$LOG"
    local result=""
    if [ $rc -ne 0 ]; then
        result=$(grep -a '^error:' "$OUT_DIR/step.out" | tail -1 | tr '|' '/')
    elif [ -n "${PICK:-}" ]; then
        result=$(tr '\r' '\n' <"$OUT_DIR/step.out" | grep -E "$PICK" | tail -${PICK_LINES:-1} | tr '\n' ' ' | tr '|' '/')
    fi
    local status=ok
    [ $rc -eq 124 ] && status="timed out (${limit} s)"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="FAILED (exit $rc)"
    printf '| %s | %s | %s | %s |\n' "$name" "$status" "$seconds" "${result:0:400}" >>"$TABLE"
    echo "--- $name: $status in ${seconds}s" | tee -a "$LOG"
    rm -f "$OUT_DIR/step.out"
}

# $PY -c "$SAME_NPZ" A B: are the images of two npz files equal, and if not, how far apart?
SAME_NPZ='
import sys, numpy as np
a, b = (np.load(path)["arr_0"].astype(np.int16) for path in sys.argv[1:3])
difference = np.abs(a - b)
print(f"images {a.shape}: identical {bool((difference == 0).all())}, mean |difference| {difference.mean():.3f} "
      f"of 255, {100 * (difference > 0).mean():.2f}% of pixel values differ")'
# $PY -c "$SPEED" RUN: steps, last loss and the median img/s of the steps logged (the first log row left out).
SPEED='
import csv, statistics, sys
rows = list(csv.DictReader(open("results/logs/" + sys.argv[1] + "/metrics.csv")))
last = rows[-1]
speed = statistics.median(float(row["img_per_sec"]) for row in rows[1:] or rows)
print("step", last["step"], "loss", round(float(last["loss"]), 4), "median", round(speed), "img/s")'

$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
*((torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported()) if torch.cuda.is_available() else ()))" \
    | tee -a "$LOG"

DEMO=(--preset demo --device "$DEVICE" --time-budget "" --sample-every 0 --log-every 100)
PICK='^done' step "train demo bf16, $N_TRAIN steps" 150 $PY train.py "${DEMO[@]}" --amp bf16 --max-steps $N_TRAIN --run-name cuda-bf16
PICK='^resuming|^done' PICK_LINES=2 step "resume it to $N_RESUME steps" 120 $PY train.py "${DEMO[@]}" --amp bf16 --max-steps $N_RESUME --run-name cuda-bf16
[ "$DEVICE" = cuda ] && PICK='^done' step "train demo fp16 (GradScaler), $N_SHORT steps" 120 $PY train.py "${DEMO[@]}" --amp fp16 --max-steps $N_SHORT --run-name cuda-fp16
PICK='^done' step "train demo --compile --channels-last, $N_SHORT steps" 180 $PY train.py "${DEMO[@]}" --amp bf16 --compile --channels-last --max-steps $N_SHORT --run-name cuda-compile
RUNS=(cuda-bf16 cuda-compile)
[ "$DEVICE" = cuda ] && RUNS+=(cuda-fp16)
for run in "${RUNS[@]}"; do
    PICK=img/s step "  $run: its metrics.csv" 30 $PY -c "$SPEED" $run
done

SAMPLE=(--run-name cuda-bf16 --device "$DEVICE" --format npz --num-samples $N_SAMPLES --batch-size $((N_SAMPLES / 4)) --sampler ddim --steps 50 --seed 0)
PICK='wrote|\.npz' step "sample $N_SAMPLES, one process" 120 $PY sample.py "${SAMPLE[@]}" --out "$OUT_DIR/one"
# One process per GPU (on a CPU, 2): their images must be those of one process. A machine of one GPU checks the
# refusal of a second process there instead.
NPROC=2
[ "$DEVICE" = cuda ] && NPROC=$($PY -c "import torch; print(torch.cuda.device_count())")
TORCHRUN=($PY -m torch.distributed.run --nproc_per_node=$NPROC)
if [ "$NPROC" -ge 2 ]; then
    PICK='wrote|\.npz' step "sample $N_SAMPLES, torchrun $NPROC processes" 180 "${TORCHRUN[@]}" sample.py "${SAMPLE[@]}" --out "$OUT_DIR/two"
    PICK='identical' step "  $NPROC processes = one process?" 60 $PY -c "$SAME_NPZ" "$OUT_DIR"/one/*.npz "$OUT_DIR"/two/*.npz
else
    PICK='torchrun started' step "sample, torchrun 2 processes on 1 GPU: refused in one sentence?" 120 bash -c 'out=$("$@" 2>&1); echo "$out" | grep "^error:" | tail -1; [ "$(grep -c "^error: torchrun started" <<<"$out")" = 1 ]' _ $PY -m torch.distributed.run --nproc_per_node=2 sample.py "${SAMPLE[@]}" --out "$OUT_DIR/two"
fi
PICK='wrote|\.npz' step "sample $N_SAMPLES, --compile (CUDA graphs)" 150 $PY sample.py "${SAMPLE[@]}" --compile --out "$OUT_DIR/compiled"
PICK='identical' step "  compiled = plain?" 60 $PY -c "$SAME_NPZ" "$OUT_DIR"/one/*.npz "$OUT_DIR"/compiled/*.npz
PICK='\.png' step "class grid" 120 $PY sample.py --run-name cuda-bf16 --device "$DEVICE" --class-grid --out "$OUT_DIR"

PICK='^CFID' step "evaluate, $N_EVAL samples, guidance 3" 120 $PY evaluate.py --run-name cuda-bf16 --device "$DEVICE" --num-samples $N_EVAL --steps 50 --guidance-scale 3
PICK='^CFID' step "evaluate, $N_EVAL samples, guidance 1" 90 $PY evaluate.py --run-name cuda-bf16 --device "$DEVICE" --num-samples $N_EVAL --steps 50

BENCH=(benchmark.py --preset $BENCH_PRESET --device "$DEVICE" --amp bf16)
COMPARE=(--compare diffusers)  # diffusers' twin exists for ddpm-cifar10 only
[ -n "${QUICK:-}" ] && COMPARE=()
PICK='^(train|sample) img/s +[0-9]' PICK_LINES=2 step "benchmark $BENCH_PRESET batch $BIG bf16 channels-last ${COMPARE[*]}" 180 $PY "${BENCH[@]}" --batch-size $BIG --channels-last "${COMPARE[@]}"
[ "$DEVICE" = cuda ] && PICK='^(train|sample) img/s +[0-9]|^sample first call' PICK_LINES=3 step "benchmark $BENCH_PRESET batch $BIG fp16 channels-last" 120 $PY benchmark.py --preset $BENCH_PRESET --device "$DEVICE" --amp fp16 --batch-size $BIG --channels-last
PICK='^(train|sample) img/s +[0-9]|^sample first call' PICK_LINES=3 step "benchmark $BENCH_PRESET batch 1, 100 steps" 120 $PY "${BENCH[@]}" --batch-size 1 --sample-steps 100
PICK='^(train|sample) img/s +[0-9]|^sample first call' PICK_LINES=3 step "benchmark $BENCH_PRESET batch 1, 100 steps, --compile (CUDA graphs)" 180 $PY "${BENCH[@]}" --batch-size 1 --sample-steps 100 --compile
PICK='^(train|sample) img/s +[0-9]|^sample first call' PICK_LINES=3 step "benchmark $BENCH_PRESET batch $BIG bf16 channels-last --compile" 240 $PY "${BENCH[@]}" --batch-size $BIG --channels-last --compile
if [ "$NPROC" -ge 2 ]; then
    PICK='^done' step "train demo, torchrun $NPROC processes, $N_SHORT steps" 180 "${TORCHRUN[@]}" train.py "${DEMO[@]}" --amp bf16 --max-steps $N_SHORT --run-name cuda-ddp
fi

echo
cat "$TABLE"
