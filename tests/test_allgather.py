"""method="allgather" (Llama 3's context parallelism: K/V all-gathered, dK/dV reduce-scattered) on P
gloo ranks vs torch SDPA on the whole sequence in fp64, vs the ring, compiled, under parallelize."""

import pytest
import torch

import allgather_cases as ac
import compile_cases
import parallel_cases as pc
from seqpar.testing import numerics
from seqpar.vocab import LAYOUTS


@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("layout,causal", [(lay, True) for lay in LAYOUTS] + [("zigzag", False)])
def test_return_lse(worlds, P, layout, causal):
    for r in worlds(P).run(ac.lse_error, layout=layout, causal=causal):
        assert r["dtype"] == "torch.float32" and r["shape"] == (2, 4, 6), r
        assert r["lse"] < 1e-5 and r["out"] < 1e-5, r


@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_collective_counts(worlds, P, layout):
    """Forward: exactly one all-gather (the fused K/V). Backward: one all-gather + one reduce-scatter.
    No ring exchange, nothing else. World size 1: no communication at all."""
    for counts in worlds(P).run(ac.count_collectives, layout=layout, causal=True):
        if P == 1:
            assert counts == dict(fwd=[], bwd=[]), counts
        else:
            assert counts["fwd"] == ["all_gather"], counts
            assert sorted(counts["bwd"]) == ["all_gather", "reduce_scatter_single"], counts


@pytest.mark.parametrize("P,layout,causal", [(2, "zigzag", True), (3, "striped", True), (4, "contiguous", True),
                                             (4, "zigzag", True), (3, "zigzag", False)])
def test_forward_and_dq_bitwise_equal_ring(worlds, P, layout, causal):
    """The same tiles merged in the ring's order: out and dq bitwise the ring's; dk, dv summed in another order."""
    for d_out, d_q, d_k, d_v in worlds(P).run(ac.matches_ring, layout=layout, causal=causal):
        assert d_out == 0.0 and d_q == 0.0, (d_out, d_q)
        assert d_k < 1e-5 and d_v < 1e-5, (d_k, d_v)


@pytest.mark.parametrize("P", [1, 3])
def test_record_hook(worlds, P):
    """One record per computed tile, step = the kv rank; contiguous skips the tiles above the diagonal."""
    for rank, steps in enumerate(worlds(P).run(ac.recorded_steps, layout="contiguous")):
        want = [(rank - s) % P for s in range(P) if (rank - s) % P <= rank]
        assert steps == [("forward", j) for j in want] + [("backward", j) for j in want], (rank, steps)


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_checkpoint_replay(worlds, layout):
    for gathers, grad_diff, out_diff in worlds(2).run(ac.checkpoint_replay, layout=layout):
        assert gathers == 0 and grad_diff == 0.0 and out_diff == 0.0, (gathers, grad_diff, out_diff)


@pytest.mark.parametrize("layout,causal,hkv", [(lay, True, 2) for lay in LAYOUTS] + [("zigzag", False, 4)])
def test_compiled_function_aot_eager_is_bitwise_eager(worlds, layout, causal, hkv):
    for r in worlds(2).run(compile_cases.compiled_function, backend="aot_eager", layout=layout, causal=causal,
                           hkv=hkv, method="allgather", timeout=240):
        assert r["eager_diff"] == 0.0 and r["breaks"] == 0, r
        numerics.assert_within_bound(r["errors"], torch.float32)


@pytest.mark.parametrize("layout,ckpt", [("zigzag", False), ("striped", True), ("contiguous", False)])
def test_parallelize_llama(worlds, layout, ckpt):
    """seqpar.parallelize(llama, mesh, method="allgather", fsdp=False): loss, grads, params after 3 steps
    equal the single process (cp=4)."""
    pytest.importorskip("transformers")
    for res in worlds(4).run(pc.equivalence, kind="llama", dp=1, cp=4, layout=layout, fsdp=False, checkpoint=ckpt,
                             method="allgather"):
        assert res["ngrads"] > 0 and res["loss"] <= 1e-5 and res["grad"] <= 1e-4 and res["param"] <= 1e-4, res


@pytest.mark.parametrize("n", [3])
def test_mpi_transport(n, mpirun):
    """seqpar.MPIGroup: all-gather and reduce-scatter through mpi4py, under mpirun."""
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([tests, os.path.dirname(tests), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([*mpirun(n), sys.executable, "-c", "import allgather_cases; allgather_cases.mpi_main()"],
                       env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(line for line in r.stdout.split("\n") if line.startswith("OK")) == [f"OK {i}" for i in range(n)]
