"""FSDP2's memory options through seqpar.parallelize (precision, reshard, fsdp_offload) on 4 spawned gloo
ranks (CPU) against single-process runs, plus the refusals and FSDPOptions' byte count.

Cases live in fsdp_option_cases.py; every world call runs one case on all 4 ranks.
"""

from __future__ import annotations

import pytest

import fsdp_option_cases as fc
from seqpar.fsdp_options import FSDPOptions

pytest.importorskip("transformers")

P = 4
# (dp, cp, precision, reshard, fsdp_offload, checkpoint): every value of every option, on dp=2 x cp=2 and cp=4
GRID = [
    (2, 2, "bf16", "after_forward", "none", False),
    (1, 4, "bf16", "keep", "none", True),
    (2, 2, "fp16", "after_forward", "cpu", False),
    (1, 4, "fp32", "keep", "cpu", False),
    (2, 2, "fp32", "keep", "none", False),
]
DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# One rounding of the compute dtype (2^-8 bf16, 2^-11 fp16): the floor of the mixed-precision bound
EPS = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}


def _check(res: dict, precision: str, reshard: str, offload: str, what: str) -> None:
    err, seen = res["err"], res["seen"]
    assert err["ngrads"] > 0, what
    if precision == "fp32":
        assert err["loss"] <= 1e-5 and err["grad"] <= 1e-4 and err["param"] <= 1e-4, (what, err)
    else:
        # Rounding to bf16 / fp16 in forward and backward puts the single-process model cast to that dtype
        # about 1e-3..2e-2 (relative to each tensor's max) off the fp32 model; the sharded run rounds the
        # same ops in another order (partial gradients per rank, summed in fp32). The bound (DESIGN's
        # numerics rule): at most twice the single-process error in the same dtype, plus one rounding.
        low = res["low"]
        for k in ("loss", "grad", "param"):
            assert err[k] <= 2 * low[k] + EPS[precision], (what, k, err, low)
            assert err[k] <= 0.1, (what, k, err, low)  # the yardstick itself is sane
    # the option took effect, as FSDP recorded it and as the block saw it in its forward
    compute = DTYPE[precision]
    assert seen["param_in_forward"] == compute and seen["input_in_forward"] == compute, (what, seen)
    assert (seen["mp_param_dtype"], seen["mp_reduce_dtype"]) == (
        ("None", "None") if precision == "fp32" else (compute, "float32")), (what, seen)
    dtypes = {name: {d for n, d in seen["collectives"] if n == name} for name, _ in seen["collectives"]}
    assert dtypes["all_gather_single"] == {compute}, (what, dtypes)  # parameters gathered in the compute dtype
    assert dtypes["reduce_scatter_single"] == {"float32"}, (what, dtypes)  # gradients reduced in fp32
    assert seen["grad_dtype"] == "float32", (what, seen)  # fp32 sharded gradients for the optimizer
    want = "sharded" if reshard == "after_forward" else "unsharded"
    assert seen["block_after_forward"] == want, (what, seen)
    assert seen["root_after_forward"] == "unsharded", (what, seen)  # the root keeps its parameters in both
    assert seen["offload_to_cpu"] is (offload == "cpu") and seen["pin_memory"] is False, (what, seen)
    assert seen["grad_device"] == "cpu", (what, seen)
    if reshard == "keep":
        assert res["same"] == 0.0, (what, res["same"])  # bit-identical to reshard="after_forward"


@pytest.mark.parametrize("kind", ["llama", "gpt"])
def test_fsdp_options(worlds, kind):
    """Each value of precision / reshard / fsdp_offload (on dp=2 x cp=2 and cp=4, once with checkpoint=True):
    loss (every step), every gradient and the parameters after 2 SGD steps equal the single-process model
    (fp32 bounds, or the mixed-precision bound above), and the option is seen in effect."""
    w = worlds(P)
    for dp, cp, precision, reshard, offload, ckpt in GRID:
        what = f"{kind} dp={dp} cp={cp} precision={precision} reshard={reshard} offload={offload} ckpt={ckpt}"
        for res in w.run(fc.options_case, kind=kind, dp=dp, cp=cp, precision=precision, reshard=reshard,
                         fsdp_offload=offload, checkpoint=ckpt):
            _check(res, precision, reshard, offload, what)


BAD = {
    "bf16_without_fsdp": ("ValueError", ["precision='bf16'", "fsdp=True"]),
    "keep_without_fsdp": ("ValueError", ["reshard='keep'", "fsdp=True"]),
    "offload_without_fsdp": ("ValueError", ["fsdp_offload='cpu'", "fsdp=True"]),
    "unknown_precision": ("ValueError", ["precision must be one of", "'int8'"]),
    "dtype_precision": ("TypeError", ["precision must be one of", "precision='bf16'"]),
    "bool_reshard": ("TypeError", ["reshard must be one of", "reshard='after_forward'"]),
    "unknown_reshard": ("ValueError", ["reshard must be one of", "'never'"]),
    "bool_offload": ("TypeError", ["fsdp_offload must be one of", "fsdp_offload='cpu'"]),
    "unknown_offload": ("ValueError", ["fsdp_offload must be one of", "'nvme'"]),
    "bf16_model_bf16": ("ValueError", ["precision='bf16'", "model.float()"]),
}


def test_bad_options(worlds):
    """Every rank raises the ValueError / TypeError naming the argument and the fix, and no rank called a
    collective (torch.distributed's are patched to record any call)."""
    assert set(BAD) == set(fc.BAD)
    w = worlds(P)
    for case, (etype, words) in BAD.items():
        for rank, (got, msg, called) in enumerate(w.run(fc.bad_options, case=case, timeout=60)):
            assert got == etype and all(x in msg for x in words), (case, rank, got, msg)
            assert called == [], (case, rank, called)


def test_state_bytes():
    """FSDPOptions.state_bytes: 1000 parameters on 4 ranks, blocks of at most 100, 200 on the root."""
    kw = dict(params=1000, ranks=4, largest_block=100, root=200)
    base = FSDPOptions().state_bytes(**kw)
    sharded = 250 * 4 + 250 * 4 + 250 * 8  # fp32 params + fp32 grads + Adam's two fp32 moments
    assert base == dict(params=1000, grads=1000, optimizer=2000, gathered=(200 + 2 * 100) * 4, reduce=100 * 8,
                        staging=0, host=0, device=sharded + 1600 + 800)
    bf16 = FSDPOptions(precision="bf16").state_bytes(**kw)
    assert (bf16["gathered"], bf16["reduce"], bf16["params"]) == (400 * 2, 100 * (2 + 4), 1000)
    keep = FSDPOptions(reshard="keep").state_bytes(**kw)
    assert keep["gathered"] == 1000 * 4
    cpu = FSDPOptions(fsdp_offload="cpu").state_bytes(**kw)
    assert cpu["host"] == sharded and cpu["staging"] == 25 * 4 and cpu["device"] == 1600 + 800 + 100
    with pytest.raises(ValueError, match="precision must be one of"):
        FSDPOptions(precision="fp8")
