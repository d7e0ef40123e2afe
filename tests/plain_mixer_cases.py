"""Cases for tests/test_mixer_models.py: a plain-PyTorch model with a sequence mixer besides attention.

:class:`ConvGPT` is seqpar.models' nanoGPT-style model with a causal depthwise ``nn.Conv1d`` token mixer before
the attention of every block (kernel 4, so a token reads its 3 predecessors: across shard boundaries under every
layout). The reference is the unmodified model on the whole sequence in this process (plain SDPA, plain
cross-entropy on the shifted labels), never seqpar code.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import seqpar
from seqpar.models import CausalSelfAttention, GPTConfig, LMOutput

KERNEL, VOCAB, S = 4, 64, 40
_MESHES: dict = {}


class CausalConv(nn.Module):
    """Depthwise causal convolution along the sequence: x (B, S, C) -> (B, S, C), token t reads t-3 .. t."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel, groups=channels, padding=kernel - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)


class ConvBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_0, self.mixer = nn.LayerNorm(cfg.n_embd), CausalConv(cfg.n_embd, KERNEL)
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd), CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        c = cfg.n_embd
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, C)
        x = x + self.mixer(self.ln_0(x))
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ConvGPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(cfg.vocab_size, cfg.n_embd), nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList([ConvBlock(cfg) for _ in range(cfg.n_layer)])
        self.ln_f, self.lm_head = nn.LayerNorm(cfg.n_embd), nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> LMOutput:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(position_ids)  # (B, S, C)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, S, V)
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return LMOutput(loss, logits)


def conv_gpt() -> ConvGPT:
    torch.manual_seed(0)
    m = ConvGPT(GPTConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    with torch.no_grad():  # the convolutions off their init, so a missing halo shows
        for b in m.h:
            b.mixer.conv.weight.normal_(0.0, 0.5)
    return m


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    return float((a.double() - b.double()).abs().max() / max(float(b.abs().max()), floor, 1e-30))


def plain_mixer_exact(rank: int, size: int, *, mixers: str, layout: str, fsdp: bool = False,
                      checkpoint: bool = False) -> dict:
    """ConvGPT under ``parallelize(mixers=..., layout=...)`` + shard_batch vs the single-process model: loss rel,
    the worst gradient rel (floored at 1e-4 of the largest gradient entry), and the paths the mixers took."""
    from seqpar.passes.sequence_mixers import mixer_plans

    if size not in _MESHES:
        _MESHES[size] = seqpar.init_mesh(cp=size)
    mesh = _MESHES[size]
    ref = conv_gpt()
    ids = torch.randint(0, VOCAB, (2, S), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :7] = -100
    model = seqpar.parallelize(copy.deepcopy(ref), mesh, layout=layout, mixers=mixers, fsdp=fsdp, checkpoint=checkpoint)
    logits = ref(ids).logits
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    want.backward()
    got = model(**seqpar.shard_batch({"input_ids": ids, "labels": labels}, mesh, layout=layout)).loss
    got.backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    floor = 1e-4 * max(float(g.abs().max()) for g in grads.values())
    params = dict(model.named_parameters())
    full = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for n, p in params.items()}
    plans = mixer_plans(model)
    return {"loss": _rel(got.detach(), want.detach()), "grad": max(_rel(full[n], g, floor) for n, g in grads.items()),
            "paths": sorted({p.how for p in plans}), "mixers": [p.path for p in plans],
            "calls": sum(p.calls for p in plans)}


def plain_mixer_refused(rank: int, size: int) -> str:
    """``mixers="refuse"``: the error parallelize raises on this rank (before any communication), or ""."""
    if size not in _MESHES:
        _MESHES[size] = seqpar.init_mesh(cp=size)
    try:
        seqpar.parallelize(conv_gpt(), _MESHES[size], mixers="refuse", fsdp=False)
    except (ValueError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}"
    return ""
