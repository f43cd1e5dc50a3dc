#!/usr/bin/env bash
# Everything a lent GPU session runs, in two stages (so a failure in one leaves the other):
#
#   bash benchmarks/gpu_session.sh test     build with CUDA, GPU tests of every backend
#   bash benchmarks/gpu_session.sh bench    kernel benchmarks (CSV), copy bandwidth
#
# Logs and CSVs go to $OUT when set (the device tool), else ./gpu_logs.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE="${1:-test}"
OUTDIR="${OUT:-gpu_logs}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
unset TRITON_INTERPRET RCEKD_BACKEND RCEKD_TRITON_CHUNK
PY=python3
T0=$(date +%s)

if [ "$STAGE" = test ]; then
    nvidia-smi -L
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    RCEKD_STRICT_BUILD=1 $PY -m pip install --no-build-isolation --no-deps -e . >"$OUTDIR/build.log" 2>&1
    echo "build rc=$? in $(( $(date +%s) - T0 )) s"
    $PY -c "import rcekd_kernels as R; print(R.describe_backends('cuda')); print(R.build_info())"
    # the three test files in parallel (16 cores compile the kernels), each with a time limit
    timeout 330 $PY -m pytest -x -q -rs -p no:cacheprovider tests/test_triton.py >"$OUTDIR/test_triton.log" 2>&1 &
    P1=$!
    timeout 330 $PY -m pytest -x -q -rs -p no:cacheprovider tests/test_native.py >"$OUTDIR/test_native.log" 2>&1 &
    P2=$!
    timeout 330 $PY -m pytest -q -rs -p no:cacheprovider tests/test_reference.py tests/test_ops.py tests/test_errors.py \
        >"$OUTDIR/test_ref.log" 2>&1 &
    P3=$!
    wait $P1; R1=$?; wait $P2; R2=$?; wait $P3; R3=$?
    for f in test_triton test_native test_ref; do
        echo "== $f"; grep -E "FAILED|Error|error|passed|failed" "$OUTDIR/$f.log" | tail -6
    done
    echo "== summary: triton rc=$R1 native rc=$R2 reference/ops/errors rc=$R3, $(( $(date +%s) - T0 )) s"
fi

if [ "$STAGE" = bench ]; then
    CSV="$OUTDIR/loss_gpu.csv"
    $PY - <<'EOF' | tee "$OUTDIR/copy_bw.txt"
import torch
x = torch.empty(2**30 // 4 * 2, device="cuda")  # 2 GiB
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
ts = []
for _ in range(20):
    a.record(); y.copy_(x); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
ts.sort()
ms = ts[len(ts) // 2]
print(f"copy_bandwidth_gb_s {2 * x.numel() * 4 / ms / 1e6:.1f} (device-to-device copy of 2 GiB, read + write, median of 20: {ms:.3f} ms) {torch.cuda.get_device_name()}")
EOF
    B="$PY benchmarks/bench_loss.py --csv $CSV --device cuda --B 1024 --K 100 --M 200 --L 100"
    timeout 200 $B --providers triton cuda reference --N 25181 40981 1000000 --dtypes float32 bfloat16 \
        --ops fwd bwd fwdbwd --repeats 15 --warmup 3 2>&1 | grep -vE "^\s*$|warn" | tee "$OUTDIR/bench.log"
    timeout 150 $B --providers compile --N 25181 40981 --dtypes float32 --ops fwdbwd --repeats 10 --warmup 3 \
        2>&1 | grep -E "^(fwd|bwd|fwdbwd|select)" | tee -a "$OUTDIR/bench.log"
    timeout 100 $B --B 4096 --providers triton cuda reference --ops select_epoch --users 29858 --N 40981 \
        --repeats 5 --warmup 1 2>&1 | grep -E "^(select)" | tee -a "$OUTDIR/bench.log"
    echo "== bench done in $(( $(date +%s) - T0 )) s"
fi
