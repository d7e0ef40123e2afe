"""The training job (seqpar.train): resume continues the same run, bit for bit; two runs of the same job
are bitwise identical; the torchrun entry point works. Killed saves: test_checkpoint_kill.py."""

from __future__ import annotations

import json
import os
import sys

import pytest

from seqpar.testing import processes as procs

pytest.importorskip("transformers")

P = 4
SMALL = ["--seq-len", "256", "--pairs", "2", "--value-run", "4", "--hidden", "32", "--quiet", "--plot", ""]


def train_case(rank, size, *, argv):
    from seqpar.train import make_parser, run

    res = run(make_parser().parse_args(argv))
    return dict(losses=res["losses"], resumed_from=res["resumed_from"], param_digest=res["param_digest"])


@pytest.mark.parametrize("extra", [[], ["--dp", "2", "--checkpoint"]], ids=["cp4-fsdp", "dp2xcp2-ckpt"])
def test_resume_continues_the_same_run(worlds, tmp_path, extra):
    """N steps, save (torch.distributed.checkpoint), a fresh model + optimizer resumed for M more ==
    N + M steps uninterrupted (the data of a step depends on the step only)."""
    N, M = 3, 2
    w = worlds(P)
    base = [*SMALL, *extra, "--save", str(tmp_path / "ckpt")]
    first = w.run(train_case, argv=[*base, "--steps", str(N)])
    resumed = w.run(train_case, argv=[*base, "--steps", str(N + M), "--resume"])
    whole = w.run(train_case, argv=[*SMALL, *extra, "--steps", str(N + M)])
    for r in range(P):
        assert len(first[r]["losses"]) == N and resumed[r]["resumed_from"] == N
        assert resumed[r]["losses"][:N] == first[r]["losses"]
        assert resumed[r]["losses"] == whole[r]["losses"]  # CPU: bitwise
        assert resumed[r]["param_digest"] == whole[r]["param_digest"]
    assert whole[0]["losses"][-1] != whole[0]["losses"][0]  # it trains


@pytest.mark.parametrize("extra", [[], ["--dp", "2"]], ids=["cp4-fsdp", "dp2xcp2-fsdp"])
def test_same_job_twice_is_bitwise_identical(worlds, extra):
    """The same seeds and world give the same losses and final parameters (sha256 of the full state
    dict, FSDP shards gathered) on CPU; every rank reports the same digest."""
    w = worlds(P)
    argv = [*SMALL, *extra, "--steps", "3", "--seed", "7"]
    one, two = w.run(train_case, argv=argv), w.run(train_case, argv=argv)
    assert one == two
    assert len({r["param_digest"] for r in one}) == 1
    other_seed = w.run(train_case, argv=[*argv[:-1], "8"])
    assert other_seed[0]["param_digest"] != one[0]["param_digest"]  # the digest sees the parameters


def test_torchrun_entry_point(tmp_path):
    """`torchrun -m seqpar.train` runs 4 CPU ranks, logs once (rank 0), writes metrics and a PNG."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    metrics, plot = tmp_path / "m.json", tmp_path / "loss.png"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(P),
           "-m", "seqpar.train", *SMALL[:-3], "--steps", "2", "--metrics", str(metrics), "--plot", str(plot)]
    out = procs.run(cmd, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(metrics.read_text())
    assert res["cp"] == P and res["seq_len"] == 256 and len(res["losses"]) == 2
    assert len(res["param_digest"]) == 64
    assert plot.stat().st_size > 1000
    assert out.stdout.count("seqpar-train: final loss") == 1  # one log line per job, from rank 0
