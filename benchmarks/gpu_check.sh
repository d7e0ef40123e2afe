#!/usr/bin/env bash
# One GPU check for the Triton kernels, sized for one device call of at most 8 minutes (1 GPU); every
# step has its own timeout (200 + 150 + 70 + 40 s) so a slow step cannot starve the others:
#   1. GPU tests: compiled kernels vs the fp64 reference (every mask kind, GQA, odd D, Sq != Sk, strides,
#      fp32/bf16/fp16), the accumulating forward, and the whole ring on P = 4 and 8 thread-ranks
#      (seqpar.comm.threads) with backend="triton" in bf16 vs SDPA on the whole sequence   (SEQPAR_TRITON_TUNE=off)
#   2. the kernel benchmark (--quick): TFLOP/s fwd / bwd / both vs SDPA-flash, bf16, + accumulate vs merge
#   3. a 1M-token causal fwd+bwd of one layer's attention (8 q heads, 1 kv head, D=128, bf16): memory O(S)
#   4. a table of the ThreadRing ring errors, P = 4 and 8, every layout, bf16, vs SDPA
# Usage: bash benchmarks/gpu_check.sh      (PYTHON=... to pick the interpreter; results also go to $OUT if set)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
RES=benchmarks/results
mkdir -p "$RES"
status=0
step() { echo; echo "=== $1 ($(date +%T))"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" || exit 1

step "1. GPU tests (compiled Triton, ThreadRing P=4/8 bf16)"
SEQPAR_TRITON_TUNE=off timeout 200 $PY -m pytest -q -x -p no:cacheprovider \
    tests/test_triton_kernels.py tests/test_threaded_ring.py -k "cuda" 2>&1 | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "GPU TESTS FAILED"; status=1; }

step "2. kernel benchmark (quick)"
timeout 150 $PY benchmarks/kernels.py --device cuda --quick 2>&1 | tail -40 || status=1

step "3. 1M-token causal fwd+bwd, Hq=8 Hkv=1 D=128 bf16"
timeout 70 $PY benchmarks/kernels.py --device cuda --million 2>&1 | tail -8 || status=1

step "4. ThreadRing ring, backend=triton, bf16, vs SDPA on the whole sequence"
PYTHONPATH=tests timeout 40 $PY - <<'PY' || status=1
import sys, torch
from seqpar.testing.numerics import violations
from seqpar.vocab import LAYOUTS
import threaded_cases as T
print(f"{'P':>2} {'layout':>10} " + " ".join(f"{n + ' err/sdpa':>22}" for n in ("out", "dq", "dk", "dv")) + "  ok")
bad = 0
for P in (4, 8):
    for layout in LAYOUTS:
        r = T.ring_equivalence(P, seed=P, B=1, Hq=8, Hkv=1, S=512 * P, D=128, layout=layout, causal=True,
                               dtype=torch.bfloat16, backend="triton", device="cuda", mode="direct")
        ok = not violations(r, torch.bfloat16)
        bad += not ok
        print(f"{P:>2} {layout:>10} " + " ".join(f"{r[n]['seqpar']:>10.2e}/{r[n]['sdpa']:<11.2e}" for n in r) + f"  {ok}")
sys.exit(1 if bad else 0)
PY

if [ -n "${OUT:-}" ]; then cp -f "$RES"/kernels_cuda.* "$RES"/kernels_million.json "$OUT"/ 2>/dev/null || true; fi
echo; echo "=== done ($(date +%T)), status $status"
exit $status
