"""A real one-node SLURM cluster (launch/local_cluster.sh: Debian slurm-wlm + munge) runs the project's
sbatch scripts with `sbatch --wait`: both forms, 2 ranks each, running the training job (seqpar.train) for
3 steps; the job's exit code (passed through by sbatch), its log, and its final loss (finite, equal to
the same run under torchrun) are checked. Also the equivalence payload and a failing rank's exit code."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile

import pytest

from seqpar.testing import processes as procs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _sbatch(conf: str, script: str, *payload: str, extra_env=None, timeout=240) -> tuple[int, str]:
    env = {**procs.launcher_env(), "SLURM_CONF": conf, **(extra_env or {})}
    fd, log = tempfile.mkstemp(prefix="seqpar-sbatch-", suffix=".out")
    os.close(fd)
    cmd = ["sbatch", "--wait", "--parsable", f"--output={log}", os.path.join(ROOT, script), *payload]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        subprocess.run(["scancel", "--quiet", "-u", "root"], env=env, timeout=30)
        pytest.fail(f"sbatch --wait {script} did not finish in {timeout}s: {open(log).read()}")
    text = open(log).read()
    os.unlink(log)
    return p.returncode, f"{text}\n[sbatch stderr] {err}"


def _train_args(d: str, name: str) -> list[str]:
    """A 3-step run of the training job with a tiny task; task options only where its CLI has them."""
    from seqpar.train import make_parser

    opts = {o for action in make_parser()._actions for o in action.option_strings}
    args = ["-m", "seqpar.train", "--steps", "3", "--seq-len", "1024", "--quiet"]
    for opt, value in (("--pairs", "2"), ("--run", "8"), ("--value-run", "8")):
        if opt in opts:
            args += [opt, value]
    return [*args, "--plot", os.path.join(d, f"{name}.png"), "--metrics", os.path.join(d, f"{name}.json")]


def _final_loss(d: str, name: str) -> float:
    res = json.loads(open(os.path.join(d, f"{name}.json")).read())
    assert res["world"] == 2 and res["steps"] == 3, res
    assert math.isfinite(res["final_loss"]), res
    return res["final_loss"]


@pytest.fixture(scope="module")
def torchrun_loss(tmp_path_factory):
    """The same 3-step training run under torchrun (2 local ranks), outside SLURM: the reference."""
    if importlib.util.find_spec("seqpar.train") is None or importlib.util.find_spec("transformers") is None:
        pytest.skip("seqpar.train (and transformers) not available")
    d = str(tmp_path_factory.mktemp("torchrun"))
    env = procs.launcher_env()
    r = procs.run([os.path.join(BIN, "torchrun"), "--nproc-per-node", "2", *_train_args(d, "ref")], cwd=ROOT,
                  env=env, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    return _final_loss(d, "ref")


def test_srun_sbatch_one_task_per_rank(slurm, torchrun_loss, tmp_path):
    """srun.sbatch: 2 tasks, each `python -m seqpar.train` initialised from the SLURM variables."""
    rc, log = _sbatch(slurm, "launch/slurm/srun.sbatch", *_train_args(str(tmp_path), "srun"))
    assert rc == 0, log
    assert "2 tasks" in log, log
    assert abs(_final_loss(str(tmp_path), "srun") - torchrun_loss) < 1e-5, log


def test_train_sbatch_torchrun_per_node(slurm, torchrun_loss, tmp_path):
    """train.sbatch: one srun task per node running torchrun (c10d rendezvous), 2 ranks per node."""
    rc, log = _sbatch(slurm, "launch/slurm/train.sbatch", *_train_args(str(tmp_path), "train"),
                      extra_env={"GPUS_PER_NODE": "2"})
    assert rc == 0, log
    assert "rendezvous" in log and "1 node(s) x 2" in log, log
    assert abs(_final_loss(str(tmp_path), "train") - torchrun_loss) < 1e-5, log


def test_srun_sbatch_equivalence_payload(slurm):
    """launch/check.py under srun: the equivalence subset, ranks initialised from SLURM."""
    rc, log = _sbatch(slurm, "launch/slurm/srun.sbatch", "launch/check.py")
    assert rc == 0, log
    assert "SEQPAR-CHECK OK source=slurm world=2" in log, log


def test_sbatch_passes_a_failing_rank_through(slurm):
    """Rank 1 of 2 exits 3: srun --kill-on-bad-exit ends the step and sbatch --wait returns non-zero."""
    rc, log = _sbatch(slurm, "launch/slurm/srun.sbatch", "-c",
                      "import os, sys; sys.exit(3 if os.environ['SLURM_PROCID'] == '1' else 0)")
    assert rc != 0, log
