"""A real one-node SLURM cluster (launch/local_cluster.sh: Debian slurm-wlm + munge) runs the project's
sbatch scripts with `sbatch --wait`: both forms, 2 ranks each, payload launch/check.py; the job's exit
code (passed through by sbatch) and its log are checked."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "launch", "local_cluster.sh")
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """SLURM_CONF of a running local cluster; stopped afterwards if this fixture started it."""
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and apt-get is unavailable to install it (Debian slurm-wlm)")
    if os.geteuid() != 0:
        pytest.skip("launch/local_cluster.sh needs root (apt-get, munged, slurmd)")
    d = str(tmp_path_factory.mktemp("slurm"))
    env = {**os.environ, "SEQPAR_SLURM_DIR": d}
    r = subprocess.run([CLUSTER, "start", "4"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert r.returncode == 0, f"local_cluster.sh start failed:\n{r.stdout}\n{r.stderr}"
        yield os.path.join(d, "slurm.conf")
    finally:
        subprocess.run([CLUSTER, "stop"], env=env, capture_output=True, text=True, timeout=60)


def _sbatch(conf: str, script: str, *payload: str, extra_env=None, timeout=150) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(SLURM_CONF=conf, OMP_NUM_THREADS="1", PATH=BIN + os.pathsep + env["PATH"], **(extra_env or {}))
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


def test_srun_sbatch_one_task_per_rank(slurm):
    rc, log = _sbatch(slurm, "launch/slurm/srun.sbatch", "launch/check.py")
    assert rc == 0, log
    assert "SEQPAR-CHECK OK source=slurm world=2" in log, log


def test_train_sbatch_torchrun_per_node(slurm):
    rc, log = _sbatch(slurm, "launch/slurm/train.sbatch", "launch/check.py", extra_env={"GPUS_PER_NODE": "2"})
    assert rc == 0, log
    assert "SEQPAR-CHECK OK source=torchrun world=2" in log, log
    assert "rendezvous" in log and "1 node(s) x 2" in log, log


def test_sbatch_passes_a_failing_rank_through(slurm):
    rc, log = _sbatch(slurm, "launch/slurm/srun.sbatch", "-c",
                      "import seqpar, sys, torch.distributed as d; seqpar.init_distributed(); sys.exit(3 * d.get_rank())")
    assert rc != 0, log
