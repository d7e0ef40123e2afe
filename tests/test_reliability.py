"""Reliability: ranks out of step fail fast with seqpar's own error; the opt-in NaN/Inf check.

The rank-death, checkpoint-kill, determinism and fuzz tests live in their own files (see
docs/reliability.md for the table of faults).
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

import dist_cases
from seqpar.testing import processes as procs

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 5.0  # seconds: seqpar.init_distributed(timeout=...) in the payload


@pytest.mark.parametrize("world,skipper", [(2, 1), (4, 2)])
def test_skipped_call_fails_every_rank_with_seqpar_error(world, skipper):
    """One rank skips one attention call: the job ends non-zero within timeout + 30 s, and the rank that
    waited for the skipper says so: seqpar's CommError naming the call, the step and ``rank N``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           str(ROOT / "launch" / "skip_call.py"), "--skipper", str(skipper), "--timeout", str(TIMEOUT)]
    t0 = time.monotonic()
    out = procs.run(cmd, env=env, timeout=TIMEOUT + 90)
    elapsed = time.monotonic() - t0
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert elapsed < TIMEOUT + 30, elapsed
    errors = re.findall(r"CommError: seqpar\.attention \(method='ring'\): group rank (\d+) of (\d+) failed in "
                        r"call #(\d+) on this group, (forward|backward) ring step (\d+) of \d+, waiting to receive "
                        r"\S+ from rank (\d+)", text)
    assert errors, text[-3000:]
    assert any(int(prev) == skipper for *_, prev in errors), errors  # the missing peer is named
    assert all(int(call) == 2 for _, _, call, *_ in errors), errors  # the others' third call found no partner
    assert "same attention calls in the same order" in text


def test_bad_input_after_agreed_shapes_fails_every_rank_after_the_timeout():
    """A rank passes an unknown layout to a call whose shapes the group already agreed on: the others are
    in the ring, it is in the agreement. Bounded: after the timeout it raises its own ValueError (naming
    ``layout``) and the other rank seqpar's CommError; the job ends non-zero."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "launch" / "skip_call.py"), "--skipper", "1", "--timeout", str(TIMEOUT), "--fault", "bad-layout"]
    t0 = time.monotonic()
    out = procs.run(cmd, env=env, timeout=TIMEOUT + 90)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and time.monotonic() - t0 < TIMEOUT + 30, text[-3000:]
    assert "[rank1]: ValueError: layout must be one of" in text, text[-3000:]
    assert "[rank0]: seqpar.comm.CommError" in text, text[-3000:]


@pytest.mark.parametrize("case,etype,text", [
    ("nan_k_rank1", "ValueError", "non-finite values (NaN or Inf) in k on rank(s) [1]"),
    ("overflow", "FloatingPointError", "in the output on rank(s) [0, 1]"),
])
def test_finite_check_raises_on_every_rank(worlds, case, etype, text):
    for rank, (got, msg) in enumerate(worlds(2).run(dist_cases.finite_check, case=case, timeout=60)):
        assert got == etype and text in msg and "call #" in msg and "SEQPAR_CHECK_FINITE=1" in msg, (rank, msg)


def test_finite_check_is_off_by_default(worlds):
    """Without the switch a NaN input is not inspected: it flows into the output (no error, no sync)."""
    res = worlds(2).run(dist_cases.finite_check, case="off", timeout=60)
    assert all(err is None for err, _ in res)
    assert any(has_nan for _, has_nan in res)
