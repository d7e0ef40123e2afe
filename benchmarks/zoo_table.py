"""The "Architectures" table of docs/usage.md: every causal LM class of the installed transformers, built
tiny (seqpar.testing.zoo), with what parallelize does with it and the oracle's word on sequence mixing.

    python benchmarks/zoo_table.py > /tmp/table.md
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


def main() -> None:
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    from seqpar.testing import zoo

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    rows = zoo.survey()
    order = {"supported": 0, "refused": 1, "not built": 2}
    def status(r):
        return "not built" if r.built else ("supported" if r.verdict.startswith("supported") else "refused")
    rows = sorted(rows, key=lambda r: (order[status(r)], r.model_type))
    counts = {s: sum(status(r) == s for r in rows) for s in order}
    print(f"transformers {transformers.__version__}: {len(rows)} causal LM classes; "
          + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".\n")
    print("| model_type | class | parallelize | why | oracle: mixes outside attention |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        oracle = {"mixes": "yes", "local": "no", "unjudged": "—"}[r.truth]
        print(f"| {r.model_type} | {r.class_name} | {status(r)} | {_why(r)} | {oracle} |")


if __name__ == "__main__":
    sys.exit(main())
