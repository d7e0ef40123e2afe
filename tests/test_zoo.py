"""Every causal LM of the installed transformers under parallelize: exact, or refused by name.

For each class of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (enumerated, not hand-picked), built tiny from its
Config (:mod:`seqpar.testing.zoo`; windows 6 and chunks 7 tokens, shorter than S=40 and not multiples of
the 5-token zigzag chunks of 4 ranks; matrices scaled x2 so a dropped mask shows), on 4 gloo ranks:
``parallelize(model, mesh, layout="zigzag")`` + ``shard_batch`` either gives the single-process model's
loss (rel <= 1e-5) and every gradient (rel <= 1e-4 of the parameter's gradient, floored at 1e-4 of the
model's largest gradient entry: a key bias's gradient is zero in exact arithmetic), or every rank raises a
ValueError / NotImplementedError / TypeError from inside seqpar that names the reason. Nothing else: no
different loss, no crash elsewhere, no rank that disagrees. Classes that cannot be built tiny here, or
whose single-process forward fails at tiny size, are listed (a bounded number), not judged.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from seqpar.testing import zoo  # noqa: E402
from seqpar.testing.worlds import WorldError  # noqa: E402

# Must be exact (the architectures the README names); a regression here is not hidden by the totals.
MUST_BE_EXACT = {"llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "mixtral", "phimoe", "gemma",
                 "gemma2", "gemma3_text", "gpt_oss", "gpt2", "deepseek_v3", "olmoe", "phi3", "granite", "cohere",
                 "cohere2", "longcat_flash"}


def _run_all(worlds) -> dict:
    results = {}
    for model_type, class_name in zoo.causal_lm_types():
        w = worlds(4)
        try:
            per_rank = w.run(zoo.exact_or_refused, model_type=model_type, class_name=class_name, timeout=240)
        except WorldError as e:  # a rank died or hung: the worst outcome, reported as such
            results[model_type] = {"class": class_name, "status": "world broke", "why": str(e)[-600:]}
            continue
        statuses = {r["status"] for r in per_rank}
        if len(statuses) > 1:
            results[model_type] = {"class": class_name, "status": "ranks differ",
                                   "why": [f"{r['status']}: {str(r.get('why', ''))[:120]}" for r in per_rank]}
        else:
            worst = max(per_rank, key=lambda r: (r.get("loss", 0.0), r.get("grad", 0.0)))
            results[model_type] = {"class": class_name, **worst}
            if _state_rounding(worst):
                results[model_type]["status"] = "exact (state rounding)"
    return results


def _state_rounding(r: dict) -> bool:
    """A mismatch only in gradients the reference itself knows to its own rounding (zoo.split_noise), on the
    state path (an adapter's algorithm rounds differently from the module's): within STATE_NOISE times it."""
    return r["status"] == "mismatch" and "state" in r.get("paths", []) and r["loss"] <= 1e-5 and \
        not r["missing"] and (r.get("noise_ratio") or 1e9) <= STATE_NOISE


def test_every_causal_lm_exact_or_refused(worlds):
    res = _run_all(worlds)
    bad = {k: v for k, v in res.items() if v["status"] not in ("exact", "exact (state rounding)", "refused", "unbuilt",
                                                               "reference fails")}
    assert sum(v["status"] == "exact (state rounding)" for v in res.values()) <= 4, res
    assert not bad, "\n".join(f"{k} ({v['class']}): {v['status']} {v.get('loss', '')} {v.get('grad', '')} "
                              f"{v.get('why', '')} {v.get('where', '')}" for k, v in bad.items())
    refused = {k: v for k, v in res.items() if v["status"] == "refused"}
    for k, v in refused.items():  # a refusal names the model class or the module, and why
        assert v["class"] in v["why"] or "model" in v["why"] or "(" in v["why"], (k, v["why"])
    exact = {k for k, v in res.items() if v["status"] == "exact"}
    assert MUST_BE_EXACT <= exact, sorted(MUST_BE_EXACT - exact)
    assert len(exact) >= 90, (len(exact), sorted(exact))
    unjudged = {k: v["why"] for k, v in res.items() if v["status"] in ("unbuilt", "reference fails")}
    assert len(unjudged) <= 30, unjudged


# -- every model with sequence mixers besides attention: exact under each mixer path

# (mixers, layout, packed): the gather path on both causal layouts with and without packed documents
# (position_ids restarting), and "auto" (state passing where an adapter is proven) on two of them
# (+ checkpoint: the recomputation gathers again with the batch's documents kept in the block's frame)
MIXER_VARIANTS = [("gather", "zigzag", False, {}), ("gather", "zigzag", True, {}), ("gather", "contiguous", False, {}),
                  ("gather", "contiguous", True, {}), ("auto", "zigzag", True, {}), ("auto", "contiguous", False, {}),
                  ("gather", "zigzag", True, {"checkpoint": True})]
# "auto" may take an adapter whose algorithm rounds differently from the module's own: a gradient the reference
# itself only knows to ~1e-6 of its terms (a gated DeltaNet's A_log at tiny size) may then be off by this many
# times the reference's own rounding (zoo.split_noise); listed in the failure message of the bound below. Genuine
# conditioning, measured against the fp64 truth (test_gated_delta.py::test_state_path_gradient_is_exact_at_model_level):
# on qwen3_next / qwen3_5_moe the adapter in fp64 is within 5.2e-10 of it, the fp32 module itself 7.3e-4 / 1.6e-3 off
# on A_log / dt_bias (floored rel; their gradients cancel to below the floor), the fp32 adapter 2.3e-4 .. 6.0e-4
STATE_NOISE = 10.0


def test_sequence_mixer_models_exact(worlds):
    """Every causal LM in which seqpar.passes.mixers finds a mixer module (enumerated: seqpar.testing.zoo.mixer_types)
    equals its single-process run on 4 ranks under every variant, or is refused by name for something else."""
    shares = worlds(4).run(zoo.mixer_types_share, timeout=240)  # zoo.mixer_types(), its builds split over the ranks
    types = [t for t in zoo.causal_lm_types() if any(t in share for share in shares)]
    assert len(types) >= 25, types
    res, bad, tolerated = {}, {}, {}
    for model_type, class_name in types:
        for mixers, layout, packed, more in MIXER_VARIANTS:
            key = (model_type, mixers, layout, packed, *sorted(more))
            try:
                per_rank = worlds(4).run(zoo.exact_or_refused, model_type=model_type, class_name=class_name,
                                         mixers=mixers, layout=layout, packed=packed, timeout=240, **more)
            except WorldError as e:
                bad[key] = f"world broke: {str(e)[-400:]}"
                continue
            statuses = {r["status"] for r in per_rank}
            worst = max(per_rank, key=lambda r: (r.get("loss", 0.0), r.get("grad", 0.0)))
            res[key] = worst
            if len(statuses) > 1:
                bad[key] = f"ranks differ: {sorted(statuses)}"
            elif _state_rounding(worst):
                tolerated[key] = (worst["noisy"], worst["noise_ratio"])
            elif worst["status"] not in ("exact", "refused", "unbuilt", "reference fails"):
                bad[key] = {k: str(v)[:300] for k, v in worst.items() if k != "where"}
            elif worst["status"] == "refused" and "sequence mixer" in worst["why"] and "attention" not in worst["why"]:
                bad[key] = f"a mixer refused: {worst['why'][:300]}"
    assert not bad, "\n".join(f"{k}: {v}" for k, v in bad.items())
    assert len(tolerated) <= 4, tolerated
    gathered = {k[0] for k, v in res.items() if k[1] == "gather" and v["status"] == "exact"}
    assert len(gathered) >= 20, sorted(gathered)
    for (model_type, mixers, *_), v in res.items():  # the path each variant asked for was taken
        if v["status"] == "exact" and mixers == "gather":
            assert v["paths"] == ["gather"], (model_type, v["paths"])


# -- parameters shared between blocks under FSDP2 (Zamba ties its hybrid layers' shared transformer block)

def test_shared_parameters_under_fsdp(worlds):
    """Zamba (one Parameter object in layers.1 and layers.3's shared_transf) and Zamba2 under fsdp=True: exact
    (the shared children are one grouped FSDP2 unit, passes/data_parallel.fsdp_units), on the mixer test's world.
    Zamba also with checkpoint=True (the recomputation gathers the grouped unit again)."""
    for model_type, class_name, mixers, more in [("zamba", "ZambaForCausalLM", "auto", {}),
                                                 ("zamba", "ZambaForCausalLM", "gather", {"checkpoint": True}),
                                                 ("zamba2", "Zamba2ForCausalLM", "auto", {})]:
        per_rank = worlds(4).run(zoo.exact_or_refused, model_type=model_type, class_name=class_name, mixers=mixers,
                                 fsdp=True, packed=True, timeout=240, **more)
        worst = max(per_rank, key=lambda r: (r.get("loss", 0.0), r.get("grad", 0.0)))
        assert {r["status"] for r in per_rank} == {"exact"}, (model_type, mixers, more,  # every rank, not the worst's
                                                              {k: str(v)[:300] for k, v in worst.items()})


def test_fsdp_units_of_shared_parameters():
    """One process: the grouped unit of Zamba's shared children comes first and blocks keep their own; a
    parameter the model itself shares with its blocks is refused by name with the way out."""
    import torch
    from torch import nn

    from seqpar.passes.check import find_blocks
    from seqpar.passes.data_parallel import fsdp_units

    m = zoo.build("zamba", "ZambaForCausalLM").model
    blocks = find_blocks(m)
    names = {id(x): n for n, x in m.named_modules()}
    units = [[names[id(x)] for x in u] for u in fsdp_units(m, blocks)]
    shared = [b for b in range(len(blocks)) if hasattr(blocks[b], "shared_transf")]
    assert len(shared) >= 2 and units[0] == [f"model.layers.{b}.shared_transf" for b in shared], units
    assert units[1:] == [[f"model.layers.{b}"] for b in range(len(blocks))], units

    class Block(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.w = w

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))
            self.layers = nn.ModuleList([Block(self.w), Block(self.w)])

    t = Tied()
    with pytest.raises(ValueError, match=r"parameter 'w' is shared.*fsdp=False"):
        fsdp_units(t, find_blocks(t))
