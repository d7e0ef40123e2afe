"""Cases for tests/test_grad_reduction.py, run on every rank of a spawned gloo world. References are the
unmodified models in one process, never seqpar code."""

from __future__ import annotations

import copy

import torch
import transformers

import seqpar
from seqpar.testing import zoo
from parallel_cases import _full, _rel, make_batch, make_model, mesh_for, reference_loss


def accumulation(rank, size, *, fsdp, dp, cp, cast=None):
    """Two micro-batches accumulated before one optimizer step: every gradient equals the single-process
    sum of the two (mean over dp replicas), so no backward's contribution is reduced twice. ``cast``: a dtype
    both models are converted to after parallelize (fsdp=False's per-dtype grouping made at parallelize must
    follow the parameters' new dtype)."""
    mesh = mesh_for(dp, cp)
    ref = make_model("llama")
    model = seqpar.parallelize(copy.deepcopy(ref), mesh, layout="zigzag", fsdp=fsdp)
    if cast is not None:
        ref, model = ref.to(cast), model.to(cast)
    replica = mesh.get_local_rank("dp")
    for micro in range(2):
        batches = [make_batch(d, 1, 32, step=micro) for d in range(dp)]
        (sum(reference_loss("llama", ref, b) for b in batches) / dp).backward()
        model(**seqpar.shard_batch(batches[replica], mesh, layout="zigzag")).loss.backward()
    got = dict(model.named_parameters())
    return max(_rel(_full(got[n].grad), p.grad) for n, p in ref.named_parameters())


def unused_experts(rank, size, *, fsdp):
    """LongCat-Flash (tiny: MoE with zero-computation experts) on 32 tokens over 4 ranks: experts get no token
    on some rank, so the ranks' autograd graphs differ (a per-parameter all-reduce hook crashed gloo here).
    Gradients equal the single process's; a parameter no rank used keeps grad None (fsdp=False).
    Returns (worst rel error, #params with no grad in ref, #same here)."""
    cls = transformers.LongcatFlashForCausalLM
    cfg = zoo.tiny_config("longcat_flash", cls)
    torch.manual_seed(0)
    ref = cls(cfg).float()
    mesh = mesh_for(1, size)
    model = seqpar.parallelize(copy.deepcopy(ref), mesh, layout="zigzag", fsdp=fsdp, mlp="full")
    ids = torch.randint(3, 80, (1, 32), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "labels": ids.clone()}
    ref(**batch, use_cache=False).loss.backward()
    model(**seqpar.shard_batch(batch, mesh, layout="zigzag")).loss.backward()
    got = dict(model.named_parameters())
    # the router's gradient is ~1e-11 (top-1 routing renormalised to weight 1): floored like tests/test_zoo.py
    floor = 1e-4 * max(float(p.grad.abs().max()) for p in ref.parameters() if p.grad is not None)
    err = max(zoo._rel(_full(got[n].grad), p.grad, floor) for n, p in ref.named_parameters() if p.grad is not None)
    none_ref = sum(p.grad is None for p in ref.parameters())
    none_got = sum(got[n].grad is None for n, _ in ref.named_parameters())
    return err, none_ref, none_got
