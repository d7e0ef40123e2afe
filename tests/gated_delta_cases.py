"""Cases for tests/test_gated_delta.py, run on every rank of a spawned gloo world, and the tiny mixers they use.

The reference is the unmodified transformers mixer (or model) on the whole sequence in the same process,
never seqpar code.
"""

from __future__ import annotations

import torch
from torch import nn

from seqpar.mixing.gated_delta import GatedDeltaAdapter

F64 = torch.float64
# model_type -> causal LM class; qwen4_exp's model is not buildable tiny (its attention indexer), its mixer is
MODELS = {"qwen3_next": "Qwen3NextForCausalLM", "qwen3_5": "Qwen3_5ForCausalLM",
          "qwen3_5_moe": "Qwen3_5MoeForCausalLM", "lara_mini": "LaraMiniForCausalLM",
          "olmo_hybrid": "OlmoHybridForCausalLM", "qwen4_exp": None}
ADAPTER = GatedDeltaAdapter()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.to(F64) - b.to(F64)).abs().max() / b.to(F64).abs().max().clamp_min(1e-30)).item()


def strengthen(mod: nn.Module, seed: int = 1) -> nn.Module:
    """Weights large enough that every token matters, decays slow enough that the state crosses every run."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mod.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.02, 0.2, generator=gen).log())
            elif name.endswith("dt_bias"):
                p.copy_(torch.empty(p.shape).uniform_(-1, 0, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.ndim > 1 else 1.0))
    return mod


def mixer(model_type: str, dtype=torch.float32, **over) -> nn.Module:
    """The first gated-DeltaNet mixer of the tiny model (:func:`strengthen`-ed), in training mode."""
    import transformers

    from seqpar.testing import zoo

    if MODELS[model_type] is None:
        from transformers.models.qwen4_exp import modeling_qwen4_exp as mq

        cfg = zoo.tiny_config(model_type, transformers.Qwen4ExpForCausalLM)
        for key, val in over.items():
            setattr(cfg, key, val)
        torch.manual_seed(0)
        mod = mq.Qwen4ExpTextGatedDeltaNet(cfg, cfg.layer_types.index("linear_attention"))
    else:
        cfg = zoo.tiny_config(model_type, getattr(transformers, MODELS[model_type]))
        for key, val in over.items():
            setattr(cfg, key, val)
        torch.manual_seed(0)
        model = getattr(transformers, MODELS[model_type])(cfg)
        mod = next(m for m in model.modules() if ADAPTER.projection(m) is not None and hasattr(m, "conv1d"))
    return strengthen(mod).to(dtype).train()


def dist_context_vs_module(rank: int, size: int, model_type: str, layouts: tuple[str, ...],
                           lengths: tuple[int, ...]) -> list[tuple]:
    """The adapter on this rank's shard with the distributed context (``make_context``) against the module on the
    whole sequence: per (layout, S), the largest relative error of this rank's output, input gradient and the
    parameter gradients summed over ranks."""
    import torch.distributed as dist

    from seqpar.layout import global_indices
    from seqpar.mixing.context import make_context

    mod = mixer(model_type)
    out = []
    for layout in layouts:
        for S in lengths:
            gen = torch.Generator().manual_seed(S)
            X = torch.randn(2, S, mod.hidden_size, generator=gen)
            cot = torch.randn(2, S, mod.hidden_size, generator=gen)
            Xr = X.clone().requires_grad_()
            mod.zero_grad(set_to_none=True)
            want = mod(Xr)
            want.backward(cot)
            want_g = {n: p.grad.clone() for n, p in mod.named_parameters()}

            idx = global_indices(S, rank, size, layout)
            x = X.index_select(1, idx).requires_grad_()
            mod.zero_grad(set_to_none=True)
            got = ADAPTER.forward(mod, make_context(dist.group.WORLD, layout, S), (x,), {})
            got.backward(cot.index_select(1, idx))
            errs = [rel(got, want.detach().index_select(1, idx)), rel(x.grad, Xr.grad.index_select(1, idx))]
            for n, p in mod.named_parameters():
                dist.all_reduce(p.grad)
                errs.append(rel(p.grad, want_g[n]))
            out.append((layout, S, max(errs)))
    return out


def tiny_model(model_type: str) -> nn.Module:
    """The tiny causal LM (fp32) with its gated-DeltaNet mixers :func:`strengthen`-ed."""
    import transformers

    from seqpar.testing import zoo

    cfg = zoo.tiny_config(model_type, getattr(transformers, MODELS[model_type]))
    torch.manual_seed(0)
    model = getattr(transformers, MODELS[model_type])(cfg).float()
    for i, m in enumerate(m for m in model.modules() if ADAPTER.projection(m) is not None and hasattr(m, "conv1d")):
        strengthen(m, seed=1 + i)
    return model


def parallelize_vs_single_process(rank: int, size: int, *, model_type: str, layout: str, checkpoint: bool = False,
                                  S: int = 64) -> tuple:
    """parallelize(mixers="state") against the single-process model: (loss rel error, worst gradient rel error,
    [(mixer path, path taken, adapter, calls)])."""
    import copy

    import seqpar
    from parallel_cases import mesh_for
    from seqpar.passes.sequence_mixers import mixer_plans

    ref = tiny_model(model_type)
    mesh = mesh_for(1, size)
    model = seqpar.parallelize(copy.deepcopy(ref), mesh, layout=layout, fsdp=False, checkpoint=checkpoint,
                               mixers="state")
    ids = torch.randint(0, ref.config.vocab_size, (2, S), generator=torch.Generator().manual_seed(S))
    batch = {"input_ids": ids, "labels": ids.clone()}
    want = ref(**batch, use_cache=False).loss
    want.backward()
    got = model(**seqpar.shard_batch(batch, mesh, layout=layout)).loss
    got.backward()
    params = dict(model.named_parameters())
    grad = max(rel(params[n].grad, p.grad) for n, p in ref.named_parameters() if p.grad is not None)
    plans = [(p.path, p.how, p.adapter.name if p.adapter is not None else None, p.calls) for p in mixer_plans(model)]
    return rel(got.detach(), want.detach()), grad, plans
