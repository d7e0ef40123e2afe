"""Non-attention sequence mixers (and attention seqpar cannot take over) are refused by name at
``parallelize``, before any communication; everything else is not refused for that reason.

The truth is a numerical oracle independent of the detector (``seqpar.testing.zoo``): with every
attention call made token-local, does changing one token change the logits at other positions? It is
run on every causal LM class of the installed transformers, built tiny. The detector
(``seqpar.passes.mixers``) only reads module types, parameter names, code and the config.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

import seqpar
from seqpar.passes.mixers import ArchitectureNotSupported, architecture_problems, find_mixers

transformers = pytest.importorskip("transformers")
from seqpar.testing import zoo  # noqa: E402

# Cross-check only (the detector has no list of classes): causal LMs known to mix tokens outside
# attention (SSMs, hybrids, short convs, linear attention, recurrences).
KNOWN_MIXERS = {"mamba", "mamba2", "falcon_mamba", "jamba", "bamba", "zamba", "zamba2", "nemotron_h",
                "granitemoehybrid", "falcon_h1", "lfm2", "lfm2_moe", "lfm3", "qwen3_next", "qwen3_5_text",
                "qwen3_5_moe_text", "recurrent_gemma", "minimax", "olmo_hybrid", "xlstm", "rwkv", "kimi_linear",
                "bailing_hybrid", "lara_mini"}
# The zoo shrinks every class generically; these bounds keep the classes that cannot be built tiny (or
# run by the oracle) few. Their names are in the failure message and in docs/usage.md's table.
MAX_NOT_BUILT = 20
# Where the oracle is blind: under its token-local attention implementation these models' short convs
# (kernel 4, along the sequence) do not reach other positions' logits, although with their own attention
# they do (forward hooks on the convs show it). The detector refuses them by name (asserted below).
ORACLE_BLIND = {"inkling2_text", "inkling2_loop_text"}
MAX_UNJUDGED = 12


@pytest.fixture(scope="module")
def rows():
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    return zoo.survey()


def _named(row: zoo.Row) -> list[str]:
    """The ``path (Class)`` entries the refusal names, each checked against the model."""
    out = []
    for f in row.findings:
        if f.path:
            m = row.model.get_submodule(f.path)
            assert type(m).__name__ == f.cls, (row.model_type, f)
            assert f"{f.path} ({f.cls})" in row.verdict, (row.model_type, f, row.verdict)
            out.append(f.path)
    return out


def test_zoo_is_covered(rows):
    """Almost every causal LM class is built tiny and judged by the oracle."""
    not_built = [(r.model_type, r.built) for r in rows if r.built]
    unjudged = [(r.model_type, r.oracle.get("error")) for r in rows
                if not r.built and r.truth == "unjudged" and r.verdict.startswith("supported")]
    assert len(rows) >= 100
    assert len(not_built) <= MAX_NOT_BUILT, not_built
    # unjudged and not refused for another reason: parallelize would take them without the oracle's word
    assert len(unjudged) <= MAX_UNJUDGED, unjudged


def test_mixers_refused_by_name(rows):
    """Every model the oracle finds mixing tokens outside attention is refused, naming modules of it."""
    mixing = [r for r in rows if r.truth == "mixes"]
    assert len(mixing) >= 15, [r.model_type for r in mixing]
    for r in mixing:
        assert r.verdict.startswith("ArchitectureNotSupported"), (r.model_type, r.verdict)
        assert "does not cover" in r.verdict and r.class_name in r.verdict, r.verdict
        assert _named(r), (r.model_type, r.verdict)


def test_token_local_models_not_refused(rows):
    """A model whose attention is on the interface and that mixes nothing else is taken over."""
    local = [r for r in rows if r.truth == "local" and r.model_type not in ORACLE_BLIND]
    assert len(local) >= 80
    for r in rows:
        if r.model_type in ORACLE_BLIND:
            assert r.verdict.startswith("ArchitectureNotSupported") and _named(r), r.verdict
    for r in local:
        assert r.verdict == "supported (hf)", (r.model_type, r.verdict[:500])


def test_refusals_say_why(rows):
    """Every refusal names the model class, what is not covered (with module paths where there are
    modules) and a way out; models the oracle cannot switch (no attention interface) are refused too."""
    for r in rows:
        if r.built or r.verdict.startswith("supported"):
            continue
        assert r.verdict.startswith("ArchitectureNotSupported"), (r.model_type, r.verdict)
        assert r.class_name in r.verdict and "Way out" in r.verdict, r.verdict
        _named(r)
    by_type = {r.model_type: r for r in rows}
    for alibi in ("bloom", "mpt"):
        assert "ALiBi" in by_type[alibi].verdict, by_type[alibi].verdict
    for own in ("falcon", "gpt_neo", "bloom", "mpt"):  # attention in their own code, named
        assert any(f.kind == "attention" for f in by_type[own].findings), by_type[own].verdict
    assert "ALiBi" not in by_type["falcon"].verdict  # alibi=False by default


def test_known_mixers_cross_check(rows):
    """The structural detector finds a mixer in every class of the known list (where it builds)."""
    by_type = {r.model_type: r for r in rows}
    missing = sorted(KNOWN_MIXERS - set(by_type))
    assert not missing, f"not in this transformers: {missing}"
    for mt in sorted(KNOWN_MIXERS):
        r = by_type[mt]
        if r.built:
            continue
        assert any(f.kind == "mixer" for f in architecture_problems(r.model, hf_model=True)), (mt, r.verdict)


# -- plain PyTorch models


class _Block(nn.Module):
    def __init__(self, mixer: nn.Module | None):
        super().__init__()
        self.qkv, self.mixer = nn.Linear(16, 48), mixer

    def forward(self, x):  # (B, S, 16)
        if self.mixer is not None:
            x = x + self.mixer(x)
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        return x + torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)


class _CausalConv(nn.Module):
    def __init__(self, kernel: int):
        super().__init__()
        self.conv = nn.Conv1d(16, 16, kernel, groups=16, padding=kernel - 1)

    def forward(self, x):
        return self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)


class _GRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(16, 16, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


class _Model(nn.Module):
    def __init__(self, mixer=None):
        super().__init__()
        self.layers = nn.ModuleList([_Block(None), _Block(mixer)])

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return x


def _mixes_without_attention(model: nn.Module) -> bool:
    """The oracle for plain models: SDPA replaced by v (token-local); does token 3 reach token 5?"""
    from unittest import mock

    x = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[0, 3] += 1.0
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", lambda q, k, v, **kw: v), \
            torch.no_grad():
        return not torch.allclose(model(x)[0, 5], model(y)[0, 5])


@pytest.mark.parametrize("mixer, path, cls", [
    (lambda: _CausalConv(4), "layers.1.mixer", "_CausalConv"),
    (lambda: _GRU(), "layers.1.mixer.rnn", "GRU"),
    (lambda: _CausalConv(1), None, None),  # a kernel of 1 mixes channels, not tokens
    (lambda: None, None, None),
])
def test_plain_models(mixer, path, cls):
    torch.manual_seed(0)
    model = _Model(mixer())
    names = [(f.path, f.cls) for f in find_mixers(model)]
    assert _mixes_without_attention(model) == (path is not None)
    assert names == ([(path, cls)] if path else []), names


# -- parallelize on a real (single-rank) gloo group: refused before any communication


@pytest.fixture(scope="module")
def mesh():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    fd, path = tempfile.mkstemp(prefix="seqpar-mixers-")
    os.close(fd)
    os.unlink(path)
    dist.init_process_group("gloo", store=dist.FileStore(path, 1), rank=0, world_size=1)
    try:
        yield seqpar.init_mesh(cp=1)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("model_type, expect", [("mamba", "MambaMixer"), ("lfm2", "Lfm2ShortConv"),
                                                ("minimax", "'linear_attention'"), ("bloom", "ALiBi"),
                                                ("falcon", "FalconAttention"), ("qwen3_next", "GatedDeltaNet")])
def test_parallelize_refuses_before_communication(rows, mesh, model_type, expect, monkeypatch):
    row = next(r for r in rows if r.model_type == model_type)
    assert not row.built, row.built
    calls = []
    for name in ("broadcast", "all_reduce", "all_gather", "all_gather_into_tensor", "barrier", "batch_isend_irecv"):
        real = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda *a, _n=name, _f=real, **k: (calls.append(_n), _f(*a, **k))[1])
    impl = row.model.config._attn_implementation
    with pytest.raises(ArchitectureNotSupported, match="does not cover") as e:
        seqpar.parallelize(row.model, mesh, fsdp=False, mixers="refuse")  # the mixers too (default: taken)
    assert expect in str(e.value) and isinstance(e.value, NotImplementedError)
    assert calls == [] and row.model.config._attn_implementation == impl


def test_parallelize_takes_a_supported_model(rows, mesh):
    """Control: a token-local model goes through parallelize on the same group."""
    row = next(r for r in rows if r.model_type == "llama")
    import copy

    model = seqpar.parallelize(copy.deepcopy(row.model), mesh, fsdp=False)
    assert model.config._attn_implementation.startswith("seqpar_")
