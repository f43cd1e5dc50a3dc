#!/usr/bin/env bash
# Builds the compiled extension WITH CUDA on a GPU machine, runs the native
# tests (CUDA vs reference included) and a small timing of the backends.
# Meant for a lent H100 (about 2-4 minutes there):
#
#   bash benchmarks/gpu_native.sh            # from the repository root
#
# Environment: TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default 16),
# PYTHON (default python3). Logs go to $OUT (when set) or ./gpu_native_logs.
set -uo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
export RCEKD_STRICT_BUILD=1          # a failed build is an error here, not a silent fallback
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
LOGS="${OUT:-gpu_native_logs}"
mkdir -p "$LOGS"

echo "== machine"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi not found"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
nvcc --version 2>/dev/null | tail -1

echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS)"
t0=$(date +%s)
rm -f rcekd_kernels/_C*.so
"$PY" -m pip install -v --no-build-isolation --no-deps -e . >"$LOGS/build.log" 2>&1
build_rc=$?
t1=$(date +%s)
echo "build rc=$build_rc in $((t1 - t0)) s (log: $LOGS/build.log)"
grep -E "rcekd_kernels setup|error|warning: " "$LOGS/build.log" | grep -v "^  *warnings.warn" | head -20
"$PY" -c "from rcekd_kernels.backends import native; print('build_info', native.build_info()); print('cuda backend:', native.cuda.available('cuda') or 'available')"

echo "== tests: CUDA first, then the whole file"
timeout 200 "$PY" -m pytest -x -q -rs tests/test_native.py -k "cuda" 2>&1 | tee "$LOGS/test_cuda.log" | tail -25
cuda_rc=${PIPESTATUS[0]}
timeout 240 "$PY" -m pytest -x -q -rs tests/test_native.py 2>&1 | tee "$LOGS/test_all.log" | tail -25
all_rc=${PIPESTATUS[0]}

echo "== timing (ms per call, forward + backward, float32)"
timeout 90 "$PY" - <<'EOF' 2>&1 | tee "$LOGS/timing.log"
import time, torch, rcekd_kernels
from rcekd_kernels.backends import available_backends
ok = [b for b, why in available_backends("cuda").items() if why is None]
def bench(backend, B, N, K, M, L, reps=10):
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(B, N, device="cuda", generator=g, requires_grad=True)
    t = torch.randn(B, N, device="cuda", generator=g)
    def step():
        rcekd_kernels.rce_kd_loss(s, t, K=K, M=M, L=L, backend=backend, validate=False).backward()
    step(); torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3
for shape in [(256, 10000, 100, 200, 100), (1024, 50000, 100, 200, 100), (16, 1000000, 100, 500, 100)]:
    row = []
    for b in ("reference", "triton", "cuda"):
        if b not in ok:
            row.append(f"{b}=n/a"); continue
        try:
            row.append(f"{b}={bench(b, *shape):.2f}")
        except Exception as e:  # noqa: BLE001
            row.append(f"{b}=ERR({type(e).__name__}: {str(e)[:80]})")
    print("B,N,K,M,L =", shape, " ".join(row))
EOF

echo "== summary"
echo "build: rc=$build_rc ($((t1 - t0)) s); cuda tests: rc=$cuda_rc; all native tests: rc=$all_rc"
grep -hE "passed|failed|error" "$LOGS/test_cuda.log" "$LOGS/test_all.log" | tail -2
[ "$build_rc" -eq 0 ] && [ "$cuda_rc" -eq 0 ] && [ "$all_rc" -eq 0 ]
