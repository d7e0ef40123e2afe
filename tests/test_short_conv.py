"""Short-convolution adapters (seqpar.mixing.short_conv) against the transformers modules' own forward.

Single process: each module built tiny, the adapter on a LocalContext cut into runs (some shorter than the
kernel) equals the module on the whole sequence -- output and the gradients of the input and every
parameter -- with and without a 2D padding mask; refusals by name.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from adapter_checks import compare, randomize  # noqa: E402
from seqpar.mixing import short_conv as sc  # noqa: E402
from seqpar.testing.zoo import tiny_config  # noqa: E402

T = 13
CUTS = [(), (1, 2, 5, 11), (3, 4, 6, 7, 12)]  # runs of 1 and 2 tokens: shorter than the kernel (3 / 4)
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _lfm(model_type: str, dtype: torch.dtype):
    import transformers.models as m
    cls = {"lfm2": m.lfm2.modeling_lfm2.Lfm2ShortConv, "lfm2_moe": m.lfm2_moe.modeling_lfm2_moe.Lfm2MoeShortConv,
           "lfm3": m.lfm3.modeling_lfm3.Lfm3ShortConv}[model_type]
    cfg = tiny_config(model_type)
    cfg.conv_bias = True  # exercise the in_proj / conv biases (zero padding must not see them)
    idx = list(cfg.layer_types).index("conv")
    return randomize(cls(cfg, idx)).to(dtype), cfg.hidden_size


def _inkling(kind: str, dtype: torch.dtype, k: int = 4, c: int = 16):
    import transformers.models as m
    if kind == "inkling":
        mod = m.inkling.modeling_inkling.InklingShortConvolution(c, k, 0, 0)
    elif kind in ("inkling2", "inkling2_loop"):
        mm = m.inkling2.modeling_inkling2 if kind == "inkling2" else m.inkling2_loop.modeling_inkling2_loop
        mod = getattr(mm, "Inkling2ShortConvolution" if kind == "inkling2" else "Inkling2LoopShortConvolution")(
            c, k, 0, 0)
    else:
        mm = m.inkling2.modeling_inkling2 if kind == "inkling2_dynamic" else m.inkling2_loop.modeling_inkling2_loop
        name = "Inkling2DynamicShortConvolution" if kind == "inkling2_dynamic" else \
            "Inkling2LoopDynamicShortConvolution"
        mod = getattr(mm, name)(c, 12, 4, k, 0, 0)  # hidden c in 4 heads, dynamic input width 12
    return randomize(mod).to(dtype), c


def _mask(b: int, t: int) -> torch.Tensor:
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, 7] = 0  # a hole (what a padded packed batch can look like)
    return mask


def _pick(model_type):
    return _lfm if model_type.startswith("lfm") else _inkling


KINDS = ["lfm2", "lfm2_moe", "lfm3", "inkling", "inkling2", "inkling2_loop", "inkling2_dynamic",
         "inkling2_loop_dynamic"]
ADAPTER = {"lfm2": 0, "lfm2_moe": 0, "lfm3": 0, "inkling": 1, "inkling2": 2, "inkling2_loop": 2,
           "inkling2_dynamic": 3, "inkling2_loop_dynamic": 3}


def _inputs(kind: str, c: int, dtype, masked: bool, seq_idx: bool = False) -> dict:
    g = torch.Generator().manual_seed(2)
    inputs = {"hidden_states": torch.randn(2, T, c, generator=g, dtype=torch.float64).to(dtype)}
    if masked:
        inputs["attention_mask" if kind.startswith("lfm") else "conv_mask"] = _mask(2, T)
    if kind.endswith("dynamic"):
        inputs["dynamic_input"] = torch.randn(2, T, 12, generator=g, dtype=torch.float64).to(dtype)
    if seq_idx:
        inputs["seq_idx"] = torch.tensor([[0] * 4 + [1] * 6 + [2] * 3, [0] * 12 + [1]], dtype=torch.int32)
    return inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_adapter_equals_module(kind, dtype):
    module, c = _pick(kind)(kind, dtype)
    adapter = sc.SHORT_CONV_ADAPTERS[ADAPTER[kind]]
    assert adapter.matches(module)
    # the Inkling modules compute in fp32 whatever the input: fp64 only as tight as their fp32
    tol = TOL[dtype] if kind.startswith("lfm") else TOL[torch.float32]
    for cuts in CUTS:
        for masked in (False, True):
            errs = compare(adapter, module, _inputs(kind, c, dtype, masked), T, cuts)
            assert max(errs.values()) <= tol, (kind, cuts, masked, errs)


@pytest.mark.parametrize("kind", ["inkling2_dynamic", "inkling2_loop_dynamic"])
def test_dynamic_conv_documents(kind):
    """Inkling2's dynamic conv masks taps across seq_idx boundaries; the boundary's halo travels too."""
    module, c = _inkling(kind, torch.float32)
    for cuts in CUTS:
        errs = compare(sc.SHORT_CONV_ADAPTERS[3], module, _inputs(kind, c, torch.float32, True, seq_idx=True), T,
                       cuts)
        assert max(errs.values()) <= 1e-5, (cuts, errs)


def test_matches_only_its_family():
    mods = {kind: _pick(kind)(kind, torch.float32)[0] for kind in KINDS}
    for i, adapter in enumerate(sc.SHORT_CONV_ADAPTERS):
        got = {kind for kind, mod in mods.items() if adapter.matches(mod)}
        assert got == {kind for kind, j in ADAPTER.items() if j == i}, (adapter.name, got)
    import transformers.models as m
    others = [torch.nn.Conv1d(4, 4, 3, groups=4, padding=2), torch.nn.Linear(4, 4),
              m.mamba.modeling_mamba.MambaMixer(tiny_config("mamba"), 0),
              m.recurrent_gemma.modeling_recurrent_gemma.RecurrentGemmaRecurrentBlock(tiny_config("recurrent_gemma"),
                                                                                       0)]
    for adapter in sc.SHORT_CONV_ADAPTERS:
        assert not any(adapter.matches(o) for o in others), adapter.name


def test_refusals():
    lfm, c = _lfm("lfm2", torch.float32)
    ink, _ = _inkling("inkling2", torch.float32)
    dyn, _ = _inkling("inkling2_dynamic", torch.float32)
    from seqpar.mixing.base import LocalContext
    ctx = LocalContext(T, (5,))
    x = torch.randn(2, T, c)
    with pytest.raises(NotImplementedError, match="cache"):
        sc.SHORT_CONV_ADAPTERS[0].forward(lfm, ctx, (x,), {"cache": object()})
    with pytest.raises(NotImplementedError, match="seq_idx"):
        sc.SHORT_CONV_ADAPTERS[2].forward(ink, ctx, (torch.randn(2, T, 16),), {"seq_idx": torch.zeros(2, T)})
    with pytest.raises(NotImplementedError, match="cache"):
        sc.SHORT_CONV_ADAPTERS[3].forward(dyn, ctx, (torch.randn(2, T, 16), torch.randn(2, T, 12)),
                                          {"cache": object()})
    with pytest.raises(ValueError, match="attention_mask"):  # a 4D attention mask is not a padding mask
        sc.SHORT_CONV_ADAPTERS[0].forward(lfm, ctx, (x,), {"attention_mask": torch.ones(2, 1, T, T)})
    with pytest.raises(TypeError, match="attention_mask"):  # e.g. a mask object, not a tensor
        sc.SHORT_CONV_ADAPTERS[0].forward(lfm, ctx, (x,), {"attention_mask": object()})
    with pytest.raises(ValueError, match="output="):
        sc.InklingShortConvAdapter("scaled")


@pytest.mark.parametrize("model_type, class_name", [("inkling_text", "InklingForCausalLM"),
                                                    ("inkling2_text", "Inkling2ForCausalLM"),
                                                    ("inkling2_loop_text", "Inkling2LoopForCausalLM")])
def test_parallelize_probe_takes_every_inkling_conv(model_type, class_name):
    """parallelize's probe (passes/sequence_mixers) sizes its input by the adapter's ``input_width`` and calls the
    module with the adapter's ``probe_inputs``: the key / value convolutions narrower than the hidden size and
    Inkling2's dynamic convolution (which needs ``dynamic_input``) are proven, so mixers="state" plans every taken
    mixer on the state path. Single process (the probe never communicates)."""
    from seqpar.passes.check import mixer_findings
    from seqpar.passes.sequence_mixers import _hidden_sizes, plan_mixers, probe_adapter
    from seqpar.testing import zoo

    model = zoo._reference(model_type, class_name)
    hidden = model.config.get_text_config().hidden_size
    plans = plan_mixers(model, mixer_findings(model, "hf")[0], "state", "zigzag")  # ValueError if one is unproven
    assert plans and all(p.how == "state" for p in plans), [(p.path, p.how, p.why) for p in plans]
    assert any(p.module.conv1d.in_channels < hidden for p in plans), "no narrower conv among the taken mixers"
    proven = {}
    for m in model.modules():  # every conv an adapter matches, taken or not (the dynamic ones sit in attention)
        for adapter in sc.SHORT_CONV_ADAPTERS:
            if adapter.matches(m):
                widths = _hidden_sizes(model, m, adapter)
                assert widths == [adapter.input_width(m)], (type(m).__name__, widths)
                proven[adapter.name] = probe_adapter(adapter, m, widths[0])
                assert proven[adapter.name] is None, (type(m).__name__, proven[adapter.name])
    if model_type != "inkling_text":
        assert "inkling2_dynamic_short_conv" in proven, proven
