#!/usr/bin/env bash
# The Triton backend's tests on a CUDA machine, with a compact summary.
#
#   bash benchmarks/gpu_triton.sh            (from anywhere; runs in the repository root)
#
# Installs the package (pure Python: RCEKD_NO_EXTENSION=1), runs tests/test_triton.py
# (compiles ~100 kernel variants on first use, then 1000 random configurations, the
# benchmark shapes, rows of 2**20 and 2**24 items), then times fused fwd + bwd of the
# triton and reference backends at one benchmark shape. Meant to finish in ~4 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
export RCEKD_NO_EXTENSION=1
unset TRITON_INTERPRET RCEKD_TRITON_CHUNK RCEKD_BACKEND
T0=$(date +%s)
LOG=${TMPDIR:-/tmp}/rcekd_gpu_triton
mkdir -p "$LOG"

python - <<'EOF'
import torch, triton
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| triton", triton.__version__,
      "| gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
EOF

if ! pip install --no-build-isolation --no-deps -e . >"$LOG/pip.log" 2>&1; then
    tail -n 20 "$LOG/pip.log"
    echo "== pip install failed; running from the source tree"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python -c "import rcekd_kernels as R; print(R.describe_backends('cuda'))"

timeout 480 python -m pytest -x -q -rs --durations=8 -p no:cacheprovider tests/test_triton.py \
    >"$LOG/pytest.log" 2>&1
RC=$?
grep -E "random configurations in" "$LOG/pytest.log"
tail -n 30 "$LOG/pytest.log"
T1=$(date +%s)

if [ "$RC" -eq 0 ]; then
timeout 90 python - <<'EOF'
import torch
from rcekd_kernels.backends import reference as ref
import rcekd_kernels.backends.triton as tb

def bench(fn, n=10):
    fn(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) / n

B, N, K, M, L = 1024, 40981, 100, 200, 100
for dt in (torch.float32, torch.bfloat16):
    s = torch.randn(B, N, device="cuda").to(dt)
    t = torch.randn(B, N, device="cuda").to(dt)
    rows = torch.arange(B, device="cuda")
    gr = torch.ones(B, device="cuda")
    res = {}
    for name, be in (("triton", tb), ("reference", ref)):
        fwd = lambda: be.fused_fwd(s, t, None, None, rows, K, M, L, 1.0, 10.0, 5.0, "paper", 0)
        out = fwd()
        bwd = lambda: be.fused_bwd(gr, s, t, out[2], out[3], out[1][:, 2].contiguous(), K, L, 1.0)
        sel = lambda: be.select(s, t, None, None, rows, K, M, L, 10.0, "paper", 0)
        res[name] = (bench(sel), bench(fwd), bench(bwd))
    print(f"B={B} N={N} K={K} M={M} L={L} {str(dt)[6:]:8s} ms  select / fused_fwd / fused_bwd:  "
          + "  ".join(f"{k} {a:.2f} / {b:.2f} / {c:.2f}" for k, (a, b, c) in res.items()))
EOF
fi
echo "== summary: tests/test_triton.py exit code $RC, tests $((T1 - T0)) s, total $(( $(date +%s) - T0 )) s (logs in $LOG)"
exit "$RC"
