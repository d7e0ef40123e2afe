"""The "Architectures" table of docs/usage.md: every causal LM class of the installed transformers, built
tiny (seqpar.testing.zoo), run under parallelize on 4 gloo ranks against itself in one process
(:func:`seqpar.testing.zoo.exact_or_refused`, what tests/test_zoo.py asserts), with the reason of each
refusal and the mixing oracle's word.

    python benchmarks/zoo_table.py > /tmp/table.md        (~3-5 minutes on 2 cores)
"""

from __future__ import annotations

import re
import sys
import warnings


def _why(row) -> str:
    if row.built:
        return f"not built tiny here: {row.built[:90]}"
    if row.verdict.startswith("supported"):
        return ""
    kinds = sorted({f.kind for f in row.findings})
    what = {"mixer": "sequence mixer", "attention": "attention outside AttentionInterface", "alibi": "ALiBi"}
    named = sorted({f.cls for f in row.findings if f.path})
    cfg = sorted({re.sub(r"\[\d+\]", "", f.why.split(" (")[0].split(":")[0]) for f in row.findings if f.why.startswith("config.")})
    text = ", ".join(what[k] for k in kinds) or "attention outside AttentionInterface (transformers' own check)"
    detail = ", ".join([f"`{c}`" for c in named[:3]] + [f"`{c}`" for c in cfg[:2]])
    return f"{text}: {detail}" if detail else text


def _short(why: str) -> str:
    """The first sentence of a refusal, without the model-class prefix, for a table cell."""
    why = why.split(": ", 1)[1] if why.startswith(("ValueError", "NotImplementedError", "TypeError",
                                                   "ArchitectureNotSupported")) else why
    why = re.sub(r"^seqpar(\.parallelize)?( cannot parallelize \w+)?:\s*", "", why)
    return why.replace("|", "/").replace("\n", " ").split(". ")[0][:150]


def main() -> None:
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    from seqpar.testing import zoo
    from seqpar.testing.worlds import World, WorldError

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    rows = {r.model_type: r for r in zoo.survey()}
    world = World(4)
    verdicts = {}
    try:
        for model_type, class_name in zoo.causal_lm_types():
            try:
                res = world.run(zoo.exact_or_refused, model_type=model_type, class_name=class_name, timeout=240)
                statuses = {r["status"] for r in res}
                verdicts[model_type] = res[0] if len(statuses) == 1 else {"status": "ranks differ", "why": ""}
            except WorldError as e:
                verdicts[model_type] = {"status": "world broke", "why": str(e)[-200:]}
                world.close()
                world = World(4)
    finally:
        world.close()
    order = {"exact": 0, "refused": 1, "reference fails": 2, "unbuilt": 3}
    names = dict(zoo.causal_lm_types())
    keys = sorted(verdicts, key=lambda k: (order.get(verdicts[k]["status"], 9), k))
    counts = {s: sum(v["status"] == s for v in verdicts.values()) for s in {v["status"] for v in verdicts.values()}}
    print(f"transformers {transformers.__version__}: {len(keys)} causal LM classes; "
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda x: order.get(x[0], 9))) + ".\n")
    print("| model_type | class | under parallelize | why | oracle: mixes outside attention |")
    print("| --- | --- | --- | --- | --- |")
    for k in keys:
        v = verdicts[k]
        why = _short(str(v.get("why", ""))) if v["status"] != "exact" else ""
        if v["status"] == "refused" and k in rows and rows[k].findings:
            why = _why(rows[k])
        oracle = {"mixes": "yes", "local": "no", "unjudged": "—"}[rows[k].truth] if k in rows else "—"
        print(f"| {k} | {names[k]} | {v['status']} | {why} | {oracle} |")


if __name__ == "__main__":
    sys.exit(main())
