"""A small nanoGPT-style model: plain PyTorch, attention by ``F.scaled_dot_product_attention``.

It knows nothing of parallelism; ``seqpar.parallelize`` turns its SDPA calls into ring attention.
Two things make any plain model shardable, and this one has them: positions come from an optional
``position_ids`` argument (a shard must not number its tokens 0..S/P-1), and ``labels`` are the
targets of each position (already shifted, nanoGPT style), with -100 ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

__all__ = ["GPTConfig", "GPT", "LMOutput"]


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 1024  # the longest global sequence (learned position table)
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2  # grouped-query attention when < n_head
    n_embd: int = 64
    checkpoint: bool = False  # torch.utils.checkpoint around each block while training


class LMOutput(NamedTuple):  # a tuple, so FSDP / pytree utilities see its tensors
    loss: torch.Tensor | None
    logits: torch.Tensor  # (B, S, V)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.d = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * self.d)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, S, C)
        B, S, _ = x.shape
        q, k, v = self.c_attn(x).split([self.n_head * self.d, self.n_kv_head * self.d, self.n_kv_head * self.d], -1)
        q = q.view(B, S, self.n_head, self.d).transpose(1, 2)  # (B, H, S, D)
        k = k.view(B, S, self.n_kv_head, self.d).transpose(1, 2)  # (B, Hkv, S, D)
        v = v.view(B, S, self.n_kv_head, self.d).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_head != self.n_kv_head)
        return self.c_proj(y.transpose(1, 2).reshape(B, S, -1))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> LMOutput:
        B, S = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(position_ids)  # (B, S, C)
        for block in self.h:
            if self.cfg.checkpoint and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, S, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return LMOutput(loss, logits)
