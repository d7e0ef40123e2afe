"""Checkpoints of the training job survive a kill: SIGKILL every rank in the middle of a save, then
``--resume`` continues from the last complete checkpoint, on the same loss curve as a run never killed.

The kill window comes from the test hook ``SEQPAR_TEST_SAVE_DELAY=SECONDS@STEP`` (seqpar/train.py):
the save of STEP sleeps after the shards are written, before the marker and the rename.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seqpar.testing import processes as procs

pytest.importorskip("transformers")

RANKS = 2
SMALL = ["--seq-len", "256", "--pairs", "2", "--value-run", "4", "--hidden", "32", "--quiet", "--plot", ""]
TIMEOUT = 90  # seconds, per torchrun job


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_job(p: subprocess.Popen) -> list[int]:
    """SIGKILL torchrun and its ranks (``procs.kill_group`` finds the ranks, which torchrun puts in
    sessions of their own); returns the ranks' pids."""
    ranks = procs.descendants(p.pid)
    procs.kill_group(p)
    return ranks


def torchrun(argv: list[str], *, log: Path, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(RANKS),
           "-m", "seqpar.train", *SMALL, *argv]
    with open(log, "w") as out:
        return procs.popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def finish(p: subprocess.Popen, log: Path) -> None:
    """Wait for the job (killing it and its ranks on timeout); it must succeed."""
    try:
        p.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_job(p)
        pytest.fail(f"torchrun timed out after {TIMEOUT}s:\n{log.read_text()[-3000:]}")
    finally:
        if p.poll() is None:
            kill_job(p)
    assert p.returncode == 0, log.read_text()[-3000:]


def test_sigkill_during_save_resumes_from_last_complete(tmp_path):
    """--save-every 2 --steps 6; every rank SIGKILLed while the step-4 save sleeps between its shards
    and its commit; --resume starts at step 2 and ends with the losses and parameters of a run never killed."""
    from seqpar.train import COMPLETE, SAVE_DELAY_ENV, complete_steps

    ckpt = tmp_path / "ckpt"
    ref_log, ref_json = tmp_path / "ref.log", tmp_path / "ref.json"
    finish(torchrun(["--steps", "6", "--metrics", str(ref_json)], log=ref_log), ref_log)
    ref = json.loads(ref_json.read_text())

    log = tmp_path / "killed.log"
    p = torchrun(["--steps", "6", "--save", str(ckpt), "--save-every", "2"], log=log,
                 env={SAVE_DELAY_ENV: f"{TIMEOUT}@4"})
    in_save = ckpt / ".step4.partial" / "history.json"  # the shards are written; the commit waits on the hook
    try:
        deadline = time.monotonic() + TIMEOUT
        while not in_save.exists():
            assert p.poll() is None, f"the job ended before its step-4 save:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no step-4 save after {TIMEOUT}s:\n{log.read_text()[-3000:]}"
            time.sleep(0.02)
    finally:
        ranks = kill_job(p)
    assert len(ranks) == RANKS
    deadline = time.monotonic() + 10
    while any(_alive(r) for r in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(r) for r in ranks), "a rank survived the kill"
    # what the kill left: step 2 whole, step 4 written but not committed
    assert complete_steps(ckpt) == [2]
    assert (ckpt / ".step4.partial").is_dir() and not (ckpt / ".step4.partial" / COMPLETE).exists()
    assert json.loads((ckpt / "latest.json").read_text())["step"] == 2

    res_log, res_json = tmp_path / "resumed.log", tmp_path / "resumed.json"
    t0 = time.monotonic()
    finish(torchrun(["--steps", "6", "--save", str(ckpt), "--save-every", "2", "--resume",
                     "--metrics", str(res_json)], log=res_log), res_log)
    resume_wall = time.monotonic() - t0
    res = json.loads(res_json.read_text())
    assert res["resumed_from"] == 2  # lost: steps 3-4, the ones since the last complete save
    assert res["losses"] == ref["losses"]  # steps 1-2 from the checkpoint's history, 3-6 recomputed
    assert res["param_digest"] == ref["param_digest"]
    assert complete_steps(ckpt) == [2, 4, 6]
    assert sorted(d.name for d in ckpt.iterdir()) == ["latest.json", "step2", "step4", "step6"]  # no scratch left
    print(f"resumed from step {res['resumed_from']}: checkpoint load {res['load_seconds']:.2f}s, "
          f"resumed job {resume_wall:.1f}s wall")


def test_complete_steps_at_every_kill_point(tmp_path):
    """What a kill leaves at each point of a save, and what resume picks (the highest ``step{N}`` with the marker)."""
    from seqpar.train import COMPLETE, complete_steps

    def ckpt_dir(name: str, *, marker: bool) -> None:
        d = tmp_path / name
        d.mkdir()
        (d / "__0_0.distcp").write_bytes(b"\0" * 8)
        if marker:
            (d / "history.json").write_text(json.dumps({"step": 0, "losses": []}))
            (d / COMPLETE).write_text("{}")

    assert complete_steps(tmp_path / "missing") == []
    ckpt_dir("step2", marker=True)
    ckpt_dir(".step4.partial", marker=False)  # killed while the shards were written
    assert complete_steps(tmp_path) == [2]
    shutil.rmtree(tmp_path / ".step4.partial")
    ckpt_dir(".step4.partial", marker=True)  # killed between the marker and the rename
    assert complete_steps(tmp_path) == [2]
    os.rename(tmp_path / ".step4.partial", tmp_path / "step4")  # killed after the rename, before latest.json
    (tmp_path / "latest.json").write_text(json.dumps({"step": 2, "losses": []}))
    assert complete_steps(tmp_path) == [2, 4]
    ckpt_dir("step6", marker=False)  # a step directory without the marker (not written by this code)
    ckpt_dir(".step8.old", marker=True)  # killed while an earlier run's checkpoint was being removed
    ckpt_dir("step10x", marker=True)
    assert complete_steps(tmp_path) == [2, 4]


def test_save_delay_hook(monkeypatch):
    from seqpar.train import SAVE_DELAY_ENV, _save_delay

    monkeypatch.delenv(SAVE_DELAY_ENV, raising=False)
    assert _save_delay(4) == 0.0
    monkeypatch.setenv(SAVE_DELAY_ENV, "1.5")
    assert _save_delay(2) == _save_delay(4) == 1.5
    monkeypatch.setenv(SAVE_DELAY_ENV, "3@4")
    assert (_save_delay(2), _save_delay(4)) == (0.0, 3.0)
    monkeypatch.setenv(SAVE_DELAY_ENV, "soon")
    with pytest.raises(ValueError, match=SAVE_DELAY_ENV):
        _save_delay(4)


def train_case(rank, size, *, argv):
    from seqpar.train import make_parser, run

    res = run(make_parser().parse_args(argv))
    return dict(losses=res["losses"], resumed_from=res["resumed_from"], param_digest=res["param_digest"])


def test_resume_with_only_partial_checkpoints_starts_from_scratch(worlds, tmp_path):
    """A DIR holding only leftovers (a .partial directory, a step directory without the marker, a
    latest.json pointing at it): --resume starts from step 0 (no crash) and cleans the leftovers."""
    from seqpar.train import complete_steps

    ckpt = tmp_path / "ckpt"
    (ckpt / ".step2.partial").mkdir(parents=True)
    (ckpt / ".step2.partial" / "__0_0.distcp").write_bytes(b"\0" * 16)
    (ckpt / "step2").mkdir()
    (ckpt / "step2" / ".metadata").write_bytes(b"truncated")
    (ckpt / "latest.json").write_text('{"step": 2, "loss')  # cut off mid-write
    w = worlds(RANKS)
    resumed = w.run(train_case, argv=[*SMALL, "--steps", "3", "--save", str(ckpt), "--resume"])
    fresh = w.run(train_case, argv=[*SMALL, "--steps", "3"])
    for r in range(RANKS):
        assert resumed[r]["resumed_from"] == 0
        assert resumed[r] == fresh[r]
    assert complete_steps(ckpt) == [3]
    assert sorted(d.name for d in ckpt.iterdir()) == ["latest.json", "step2", "step3"]  # step2: no marker, kept


def test_resume_skips_incomplete_newer_checkpoints(worlds, tmp_path):
    """A complete step 2 next to an unmarked step 4, a marked but uncommitted .step6.partial and a
    latest.json naming step 4: --resume continues from step 2, on the uninterrupted run's curve."""
    from seqpar.train import COMPLETE, complete_steps

    ckpt = tmp_path / "ckpt"
    w = worlds(RANKS)
    w.run(train_case, argv=[*SMALL, "--steps", "2", "--save", str(ckpt)])
    shutil.copytree(ckpt / "step2", ckpt / "step4")
    (ckpt / "step4" / COMPLETE).unlink()
    shutil.copytree(ckpt / "step2", ckpt / ".step6.partial")
    (ckpt / "latest.json").write_text(json.dumps({"step": 4, "losses": [1.0] * 4}))
    resumed = w.run(train_case, argv=[*SMALL, "--steps", "4", "--save", str(ckpt), "--resume"])
    whole = w.run(train_case, argv=[*SMALL, "--steps", "4"])
    for r in range(RANKS):
        assert resumed[r]["resumed_from"] == 2
        assert resumed[r]["losses"] == whole[r]["losses"]
        assert resumed[r]["param_digest"] == whole[r]["param_digest"]
    assert complete_steps(ckpt) == [2, 4]  # the unmarked step4 was replaced by a whole one
    assert json.loads((ckpt / "latest.json").read_text())["step"] == 4
    assert not (ckpt / ".step6.partial").exists()
