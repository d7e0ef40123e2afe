"""The distributed mixer context (seqpar.mixing.runs / seqpar.mixing.context): runs of every layout, the halo
exchange and the entry-state scan against single-process fp64 truths, forward and backward.

Runs are checked against ``seqpar.layout.global_indices`` without processes; halos and entry states on one
spawned world of 4 gloo ranks (all cases in a few calls), on thread-ranks (``ThreadGroup``) from P = 2 to 64,
and at world 1 against :class:`seqpar.mixing.LocalContext`.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import mixing_cases as mc
from seqpar.comm.threads import run_threads
from seqpar.layout import global_indices
from seqpar.mixing import LocalContext
from seqpar.mixing.context import make_context
from seqpar.mixing.runs import all_runs, local_runs
from seqpar.vocab import LAYOUT_CHOICES

RUN_CONFIGS = [(layout, S, P, None) for layout in LAYOUT_CHOICES for P in (1, 2, 3, 4) for S in (2 * P, 6 * P)] + [
    ("packed", 16, 4, (0, 1, 3, 6, 7, 16)), ("packed", 24, 4, (0, 2, 3, 13, 14, 17, 24)),
    ("packed", 12, 3, tuple(range(13))), ("packed", 20, 2, (0, 3, 4, 20)),
]


@pytest.mark.parametrize("layout, S, P, cu", RUN_CONFIGS)
def test_runs_cover_the_layout(layout, S, P, cu):
    """Every rank's runs spell out its global_indices in local order, are maximal, and their global order
    (``index``) tiles [0, S) with one numbering shared by all ranks."""
    runs = all_runs(S, P, layout, cu)
    glob = []
    for r, rr in enumerate(runs):
        assert rr == local_runs(S, r, P, layout, cu)
        idx = global_indices(S, r, P, layout, cu).tolist()
        assert [a for a, _ in rr.bounds] == [0, *[b for _, b in rr.bounds[:-1]]] and rr.bounds[-1][1] == len(idx)
        assert [g for (a, b), g0 in zip(rr.bounds, rr.starts) for g in range(g0, g0 + b - a)] == idx
        # maximal: two neighbouring runs of a rank never continue each other
        assert all(g1 != g0 + b0 - a0 for (a0, b0), g0, g1 in zip(rr.bounds, rr.starts, rr.starts[1:]))
        assert rr.n == runs[0].n
        glob += [(i, g, b - a) for i, g, (a, b) in zip(rr.index, rr.starts, rr.bounds)]
    glob.sort()
    assert [i for i, _, _ in glob] == list(range(runs[0].n))
    assert [g for _, g, _ in glob] == [0, *[g + n for _, g, n in glob[:-1]]] and glob[-1][1] + glob[-1][2] == S


def test_runs_refuse_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        local_runs(8, 2, 2, "zigzag")
    with pytest.raises(ValueError, match="divisible"):
        all_runs(6, 2, "zigzag")
    with pytest.raises(ValueError, match="cu_seqlens"):
        all_runs(8, 2, "packed", (0, 3, 7))


def test_world_one_is_the_local_context():
    """make_context without a group is one process: halos and entry states equal LocalContext's, no communication."""
    ctx, ref = make_context(None, "zigzag", 8), LocalContext(8)
    assert ctx.runs == ref.runs
    x = torch.randn(2, 8, 3, dtype=torch.float64, requires_grad=True)
    for w in (0, 2, 9):
        for a, b in zip(ctx.halo(x, w), ref.halo(x, w)):
            assert torch.equal(a, b)
    maps = mc.random_maps(1, "matrix", 3)
    assert torch.equal(ctx.entry_states(maps, "matrix")[0], ref.entry_states(maps, "matrix")[0])


def test_entry_states_dtype():
    """The scan runs in fp32 for fp32 / bf16 maps and in fp64 for fp64 maps (an fp64 model stays fp64-tight across
    runs): three runs of fp64 scale maps whose fp32 scan would be off by ~1e-8."""
    m = torch.full((1, 1), 1 + 1e-9, dtype=torch.float64)
    b = torch.full((1, 1), 1 / 3, dtype=torch.float64)
    assert make_context(None, "contiguous", 3).entry_states([(m, b)], "scale")[0].dtype == torch.float64
    ctx = LocalContext(3, (1, 2))
    h64 = ctx.entry_states([(m, b)] * 3, "scale")
    assert all(h.dtype == torch.float64 for h in h64)
    assert abs(h64[2].item() - (m.item() * b.item() + b.item())) < 1e-15
    h32 = ctx.entry_states([(m.float(), b.float())] * 3, "scale")
    assert all(h.dtype == torch.float32 for h in h32)
    h16 = ctx.entry_states([(m.bfloat16(), b.bfloat16())] * 3, "scale")
    assert all(h.dtype == torch.float32 for h in h16)


def test_halo_four_ranks(worlds):
    """halo on 4 gloo ranks equals the shifted global tensor for every layout (packed with documents of 1-3 tokens,
    zigzag chunks of 1: runs shorter than the width), widths 0-4, fp64; the gradient of a random linear functional
    of all ranks' halos equals single-process autograd."""
    for res in worlds(4).run(mc.halo_all):
        for cfg, width, fwd, grad in res:
            assert fwd == 0.0 and grad <= 1e-14, (cfg, width, fwd, grad)


def test_entry_states_four_ranks(worlds):
    """entry_states on 4 gloo ranks equals the fp64 sequential scan of all runs in global order (kinds matrix and
    scale, maps of magnitudes 1e-3 .. 1e3), relative per run <= 1e-6 (the scan is fp32); gradients of every rank's
    maps <= 1e-5 relative per map."""
    for res in worlds(4).run(mc.entry_all):
        for cfg, kind, fwd, grad in res:
            assert fwd <= 1e-6 and grad <= 1e-5, (cfg, kind, fwd, grad)


def test_gather_four_ranks_and_one(worlds):
    """seqpar.mixing.gather on 4 gloo ranks and at world 1 (group=None and a one-rank group), every layout (packed
    with documents of 1-3 tokens), fp64: gather_sequence's forward is the global tensor in global order (exact) and
    its gradient at a rank's tokens the sum over ranks of their gradients there (single-process autograd); keep_local
    keeps exactly this rank's tokens and scatters its gradient into zeros; int64 / bool tensors travel bit-exactly."""
    for res in worlds(4).run(mc.gather_all):
        assert len(res) == len(mc.CONFIGS_4) * 7
        for cfg, world, shape, g_fwd, g_grad, k_fwd, k_grad in res:
            assert g_fwd == 0.0 and g_grad <= 1e-15 and k_fwd == 0.0 and k_grad == 0.0, \
                (cfg, world, shape, g_fwd, g_grad, k_fwd, k_grad)


def test_bad_input_raises_on_every_rank(worlds):
    wants = ["ValueError: halo: width", "TypeError: halo: width", "ValueError: halo: x.shape[2]",
             "ValueError: entry_states: maps has", "ValueError: entry_states: maps[1]",
             "ValueError: entry_states: maps with", "ValueError: entry_states: kind"]
    for rank, msgs in enumerate(worlds(4).run(mc.bad_input)):
        for want, got in zip(wants, msgs):
            assert got.startswith(want), (rank, want, got)
        # the valid halo after the errors: rank 0's first run (global start 0) sees zeros, the others a
        # predecessor's row, so the ranks stayed in step
        assert msgs[-1] == f"halo of first run: {0.0 if rank == 0 else float(rank - 1)}", (rank, msgs[-1])


def test_halo_thread_ranks():
    """The same halo cases over ThreadGroup (mailbox all-gather / reduce-scatter) on 4 thread-ranks."""
    for res in run_threads(mc.threaded_halo, 4, mc.CONFIGS_4, (1, 3)):
        for cfg, width, fwd, grad in res:
            assert fwd == 0.0 and grad <= 1e-14, (cfg, width, fwd, grad)


@pytest.mark.parametrize("kind", ["matrix", "scale"])
def test_scan_error_does_not_grow_with_ranks(kind):
    """Zigzag on 2 .. 64 thread-ranks (3 .. 127 runs): the fp32 scan's error against fp64 stays at the P = 2 level
    (<= 4x and <= 1e-6 relative per run), and the gradients stay <= 1e-5 relative per map. Each P sees about 100
    runs (32 seeds at P = 2, 8 at P = 8, one at P = 64), so the maxima are over as many samples."""
    errs = {}
    for P, seeds in ((2, 32), (8, 8), (64, 1)):
        res = [r for seed in range(seeds) for r in run_threads(mc.threaded_scan, P, 2, kind, 7 + 1000 * seed)]
        errs[P] = max(r[0] for r in res), max(r[1] for r in res)
    assert errs[64][0] <= 4 * errs[2][0] and errs[64][0] <= 1e-6, errs
    assert max(g for _, g in errs.values()) <= 1e-5, errs


def test_mpi_transport(mpirun):
    """The halo and entry-state cases over seqpar.MPIGroup on 2 mpirun ranks (MPI all-gather, reduce-scatter)."""
    from seqpar.testing import processes as procs

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mixing_cases.py")
    r = procs.run([*mpirun(2), sys.executable, script], cwd=os.path.dirname(os.path.dirname(script)),
                  env=procs.launcher_env(), timeout=120)
    assert r.returncode == 0, f"mpirun exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    assert r.stdout.count("MIXING-MPI OK") == 2, r.stdout


@pytest.mark.parametrize("layout", ["zigzag", "packed"])
def test_adapters_on_the_distributed_context(layout):
    """Real mixers through their adapters (a Mamba2 mixer: halo + "scale" scan; Qwen3-Next's gated DeltaNet: halo +
    "matrix" scan) on a 4-thread-rank context equal the module on the whole sequence: output, input gradient and
    parameter gradients (summed over ranks), fp32, relative <= 2e-5."""
    pytest.importorskip("transformers")
    from seqpar.layout import unshard_tensor

    for name, (m, adapter) in mc.adapter_mixers().items():
        gen = torch.Generator().manual_seed(11)
        hs, w = (torch.randn(2, mc.ADAPTER_S, m.hidden_size, generator=gen) for _ in range(2))
        x = hs.clone().requires_grad_()
        y = m(x)
        y = y[0] if isinstance(y, tuple) else y
        params = list(m.parameters())
        truth = (y.detach(), *torch.autograd.grad((y * w).sum(), [x, *params]))
        res = run_threads(mc.threaded_adapter, 4, m, adapter, layout, hs, w)
        docs = mc.ADAPTER_CU if layout == "packed" else None
        got = [unshard_tensor([r[i] for r in res], 1, layout, docs) for i in (0, 1)]
        got += [sum(r[2][k] for r in res) for k in range(len(params))]
        errs = [((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(got, truth)]
        assert max(errs) <= 2e-5, (name, layout, errs)
