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
    return results


def test_every_causal_lm_exact_or_refused(worlds):
    res = _run_all(worlds)
    bad = {k: v for k, v in res.items() if v["status"] not in ("exact", "refused", "unbuilt", "reference fails")}
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
