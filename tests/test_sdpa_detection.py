"""Plain-SDPA model detection (seqpar/passes/check.py): structural, never the source text."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import scaled_dot_product_attention as attend

from seqpar.models import GPT, GPTConfig
from seqpar.passes.check import _calls_sdpa


class _Renamed(nn.Module):  # SDPA imported under another name
    def forward(self, q):
        return attend(q, q, q, is_causal=True)


class _OnlyMentions(nn.Module):
    """Says scaled_dot_product_attention in its docstring and a comment, never calls it."""

    def forward(self, q):
        return torch.softmax(q, -1)  # not F.scaled_dot_product_attention


def _helper(q):
    return torch.nn.functional.scaled_dot_product_attention(q, q, q)


class _ThroughHelper(nn.Module):
    def forward(self, q):
        return _helper(q)


def _make_closure():
    fn = F.scaled_dot_product_attention

    class _InClosure(nn.Module):
        def forward(self, q):
            return fn(q, q, q)

    return _InClosure()


class _Declared(nn.Module):
    seqpar_attention = "sdpa"

    def forward(self, q):
        return q


def test_structural_detection():
    assert _calls_sdpa(_Renamed())
    assert not _calls_sdpa(_OnlyMentions())  # a source-text search would take it
    assert _calls_sdpa(_ThroughHelper())
    assert _calls_sdpa(_Declared())
    assert _calls_sdpa(_make_closure())
    assert _calls_sdpa(GPT(GPTConfig(vocab_size=64, block_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=16)))
    assert not _calls_sdpa(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))

