"""The kernel self-check (seqpar.kernels.selfcheck) on the real Triton kernels, under TRITON_INTERPRET=1.

Run by tests/test_selfcheck.py in a fresh interpreter (the variable must be set before triton is
imported)::

    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python tests/selfcheck_cases.py OUT.json

Writes plain numbers and strings as JSON; the asserts are on the pytest side.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings

import torch
import torch.nn.functional as F

from seqpar.kernels import block_attention, block_attention_backward, get_backend, selfcheck


def _verdict(v: selfcheck.Verdict) -> dict:
    return dict(ok=v.ok, check=v.check, tensor=v.tensor, error=v.error, tolerance=v.tolerance, exception=v.exception,
                checks=sorted({row[0] for row in v.errors}), within=all(e <= t for _, _, e, t in v.errors))


def _explicit_call(dtype: torch.dtype) -> dict:
    """backend="triton" through the dispatcher (the check runs first, silently when it passes) vs fp64 SDPA."""
    g = torch.Generator().manual_seed(1)
    q, k, v, do = (torch.randn(1, 2, 24, 16, generator=g, dtype=torch.float64) for _ in range(4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, lse = block_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask="causal", scale=0.25,
                                   backend="triton")
        dq, _, _ = block_attention_backward(do.to(dtype), q.to(dtype), k.to(dtype), v.to(dtype), out.to(dtype), lse,
                                            mask="causal", scale=0.25, backend="triton")
    qr = q.clone().requires_grad_()
    want = F.scaled_dot_product_attention(qr, k, v, is_causal=True, scale=0.25)
    want.backward(do)
    return dict(warnings=[str(w.message) for w in caught], out_err=(out.double() - want).abs().max().item(),
                dq_err=(dq.double() - qr.grad).abs().max().item(),
                cached=selfcheck.verdict(get_backend("triton"), "cpu", dtype).ok)


def run() -> dict:
    triton = get_backend("triton")
    res = {"interpret": os.environ.get("TRITON_INTERPRET")}
    for dtype in (torch.float32, torch.bfloat16):
        res[str(dtype)] = _verdict(selfcheck.measure(triton, "cpu", dtype))
    res["explicit_float32"] = _explicit_call(torch.float32)

    # the real kernels, one entry point perturbed: the check names it
    def bad_backward(*a, **kw):
        dq, dk, dv = triton.backward(*a, **kw)
        return dq * 1.01, dk, dv

    res["perturbed_backward"] = _verdict(selfcheck.measure(dataclasses.replace(triton, backward=bad_backward), "cpu",
                                                           torch.float32))
    return res


if __name__ == "__main__":
    torch.set_num_threads(1)
    with open(sys.argv[1], "w") as f:
        json.dump(run(), f, indent=1)
