#!/usr/bin/env bash
# Everything a lent GPU session runs, in two stages (so a failure in one leaves the other):
#
#   bash benchmarks/gpu_session.sh test     build with CUDA, GPU tests of every backend
#   bash benchmarks/gpu_session.sh bench    copy bandwidth, kernel and end-to-end benchmarks (regenerate.py)
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
        tests/test_topm_dot.py tests/test_embedding.py >"$OUTDIR/test_ref.log" 2>&1 &
    P3=$!
    wait $P1; R1=$?; wait $P2; R2=$?; wait $P3; R3=$?
    for f in test_triton test_native test_ref; do
        echo "== $f"; grep -E "FAILED|Error|error|passed|failed" "$OUTDIR/$f.log" | tail -6
    done
    echo "== summary: triton rc=$R1 native rc=$R2 reference/ops/errors/topm_dot/embedding rc=$R3, $(( $(date +%s) - T0 )) s"
fi

if [ "$STAGE" = bench ]; then
    # everything benchmarks/regenerate.py measures on this GPU (copy bandwidth, kernels at the Triton
    # issue's shapes with triton/cuda/reference/compile, end to end on Gowalla when the data is there),
    # into $OUTDIR: copy_bandwidth_<tag>.txt, loss_<tag>.csv, train_<tag>.csv, plots. Copy them into
    # benchmarks/results/ and run `python benchmarks/regenerate.py --stages report` to update the README.
    # Gowalla travels in the ignored folder data/ (cp -r ../shared/data/gowalla data/; carry ["data"]).
    export RCEKD_DATA="${RCEKD_DATA:-$PWD/data}"
    timeout "${BENCH_TIMEOUT:-480}" $PY benchmarks/regenerate.py --stages copy kernels train --device cuda \
        --results "$OUTDIR" 2>&1 | grep -vE "^\s*$|[Ww]arn" | tee "$OUTDIR/bench.log"
    # where the time of the fused step goes (kernels against host overhead), both threshold searches
    for P in triton "triton[radix]"; do
        timeout 90 $PY benchmarks/profile_loss.py --provider "$P" --B 1024 --N 25181 \
            --out "$OUTDIR/profile_${P//[^a-z]/_}_gpu.txt" 2>&1 | sed -n 1,30p
    done
    echo "== bench done in $(( $(date +%s) - T0 )) s"
fi
