"""MoE router load-balancing loss under seqpar.parallelize (passes/router.py): every MoE causal LM of the
installed transformers whose loss adds transformers' load_balancing_loss_func, on 4 spawned gloo ranks
(cp=4, and dp=2 x cp=2), zigzag, against the unmodified single-process model. Cases: router_cases.py."""

from __future__ import annotations

import pytest

import router_cases as rc

pytest.importorskip("transformers")

P = 4


def _check(res: dict, what: str) -> None:
    assert res["ngrads"] > 0 and res["naux_grads"] > 0, what
    assert res["aux_value"] > 0, (what, res)
    assert res["loss"] <= 1e-5 and res["aux"] <= 1e-5, (what, res)
    assert res["grad"] <= 1e-4 and res["aux_grad"] <= 1e-4, (what, res)


def test_router_loss_is_global(worlds):
    """loss, aux_loss (rel < 1e-5) and every gradient of the loss and of aux_loss alone (rel < 1e-4) equal the
    single process', on every rank, for every supported model; dp=2 x cp=2 once."""
    w = worlds(P)
    cases = [(t, 1, 4) for t in rc.SUPPORTED] + [("mixtral", 2, 2)]
    for model_type, dp, cp in cases:
        for rank, res in enumerate(w.run(rc.router_equivalence, model_type=model_type, dp=dp, cp=cp)):
            _check(res, f"{model_type} dp={dp} cp={cp} rank {rank}")


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_router_loss_excludes_end_padding(worlds, layout):
    """S=30 on cp=4 is not a multiple of the layout's unit (8 zigzag, 4 contiguous): shard_batch pads 2 ignored
    tokens at the end of each row, and the router statistics must leave them out: loss, aux_loss (rel < 1e-5)
    and every gradient (rel < 1e-4) equal the single process' on the unpadded sequence (B=2: the rows of the
    router logits are batch-major)."""
    w = worlds(P)
    for model_type in ("mixtral", "qwen2_moe"):
        res = w.run(rc.router_equivalence, model_type=model_type, dp=1, cp=4, layout=layout, B=2, S=30)
        for rank, r in enumerate(res):
            _check(r, f"{model_type} {layout} S=30 rank {rank}")
        assert sum(r["pad"] for r in res) == 2 * 2, (model_type, layout, res)  # 2 padded tokens x B rows


def test_router_logits_without_loss(worlds):
    """A model that returns router logits but adds no router loss: output_router_logits=True is a flag on its
    way to attention, not an unknown attention argument."""
    for rel in worlds(P).run(rc.no_router_loss, model_type="glm4_moe"):
        assert rel <= 1e-5


@pytest.mark.parametrize("model_type", rc.REFUSED)
def test_refused(worlds, model_type):
    """A router loss seqpar cannot reproduce is refused by name on every rank: at parallelize (config) and at
    forward (output_router_logits=True); with the loss off, or its coefficient 0 (aux_loss dropped), it runs."""
    for res in worlds(P).run(rc.refused, model_type=model_type):
        for when in ("parallelize", "forward"):
            msg = res[when]
            assert msg is not None, (when, res)
            assert "router load-balancing loss is not supported under sequence parallelism" in msg, msg
            assert "output_router_logits=False" in msg and "router_aux_loss_coef=0" in msg, msg


def test_forward_verifies_the_models_aux_loss(worlds):
    """The model's own aux_loss is checked against the reproduced form on every forward (all ranks raise)."""
    for msg in worlds(P).run(rc.runtime_mismatch):
        assert msg is not None and "MixtralForCausalLM" in msg and "differs" in msg, msg


def test_refused_with_zero_coefficient_drops_the_local_aux_loss():
    """A refused model with router_aux_loss_coef=0 runs, and its rank-local aux_loss (which would pass for the
    global one) is not returned."""
    import torch
    from transformers import MixtralConfig

    from seqpar.passes.router import RouterLoss

    spec = RouterLoss("X", True, 4, 2, 0.0, MixtralConfig(output_router_logits=True), refusal="why")
    spec.check_call({"output_router_logits": True})  # coefficient 0: no error
    out = spec.apply({"aux_loss": torch.tensor(2.0), "router_logits": ()}, {}, group=None)
    assert out["aux_loss"] is None
    with pytest.raises(ValueError, match="X: the MoE router load-balancing loss is not supported"):
        RouterLoss("X", True, 4, 2, 0.1, MixtralConfig(), refusal="why").check_call({"output_router_logits": True})
