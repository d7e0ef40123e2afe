"""seqpar.init_distributed's launcher discovery, per environment: variables set by the test, no launcher."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from seqpar.launcher import LaunchEnv, LaunchError, discover_env, expand_nodelist, first_host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SLURM = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
         "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08,11],login"}


@pytest.mark.parametrize("nodelist,hosts", [
    ("node01", ["node01"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("gpu[1-2]-ib[3,5]", ["gpu1-ib3", "gpu1-ib5", "gpu2-ib3", "gpu2-ib5"]),
    ("login,cn[2-3],x", ["login", "cn2", "cn3", "x"]),
    ("rack[1-2]n[01-02]", ["rack1n01", "rack1n02", "rack2n01", "rack2n02"]),
    ("c-[5]", ["c-5"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[1-", "node]1[", "node[a-b]", "node[5-3]"])
def test_expand_nodelist_rejects(bad):
    with pytest.raises(LaunchError):
        expand_nodelist(bad)


def test_first_host_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert first_host("gpu[07-08,11],login") == "gpu07"


def test_no_launcher():
    assert discover_env({}) is None
    assert discover_env({"HOME": "/root", "MASTER_PORT": "1"}) is None


def test_torchrun():
    env = discover_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                        "MASTER_PORT": "29500"})
    assert env == LaunchEnv(5, 8, 1, "n1", 29500, "torchrun")


def test_torchrun_wins_over_slurm_and_mpi():
    """srun torchrun ...: torchrun's per-process variables, not the srun task's."""
    env = discover_env({**SLURM, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2",
                        "RANK": "6", "WORLD_SIZE": "16", "LOCAL_RANK": "2", "MASTER_ADDR": "h",
                        "MASTER_PORT": "1234"})
    assert (env.source, env.rank, env.world_size, env.local_rank) == ("torchrun", 6, 16, 2)


@pytest.mark.parametrize("partial", [{"RANK": "1"}, {"WORLD_SIZE": "4"}])
def test_torchrun_partial_is_an_error(partial):
    with pytest.raises(LaunchError, match="RANK, WORLD_SIZE"):
        discover_env(partial)


def test_slurm(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # the node list is parsed by seqpar, not scontrol
    env = discover_env(SLURM)
    assert env == LaunchEnv(3, 4, 1, "gpu07", 15000 + 4242 % 15000, "slurm")


def test_slurm_port_and_addr_overrides(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    env = discover_env({**SLURM, "MASTER_PORT": "23456"})
    assert (env.master_addr, env.master_port) == ("gpu07", 23456)
    env = discover_env({**SLURM, "MASTER_ADDR": "10.0.0.9"})
    assert env.master_addr == "10.0.0.9"


def test_slurm_same_port_on_every_task(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    ports = {discover_env({**SLURM, "SLURM_PROCID": str(r)}).master_port for r in range(4)}
    assert len(ports) == 1


def test_slurm_wins_over_pmi(monkeypatch):
    """srun --mpi=pmi2 sets PMI_RANK too; the SLURM variables are read first."""
    monkeypatch.setenv("PATH", "/nonexistent")
    env = discover_env({**SLURM, "PMI_RANK": "3", "PMI_SIZE": "4"})
    assert env.source == "slurm"


def test_slurm_batch_step_with_many_tasks_is_an_error():
    batch = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_ID"}
    batch["SLURM_PROCID"] = "0"
    with pytest.raises(LaunchError, match="srun"):
        discover_env(batch)


def test_slurm_batch_step_single_task_is_one_process():
    batch = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_ID"}
    assert discover_env({**batch, "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None


def test_mpirun_inside_slurm_allocation_uses_mpi():
    env = discover_env({**SLURM, "SLURM_PROCID": "0", "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
                        "OMPI_COMM_WORLD_LOCAL_RANK": "2"})
    assert (env.source, env.rank, env.world_size, env.local_rank) == ("mpi", 2, 4, 2)


def test_openmpi():
    env = discover_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                        "OMPI_COMM_WORLD_LOCAL_RANK": "1"})
    assert env == LaunchEnv(1, 2, 1, None, None, "mpi")  # address agreed through mpi4py later


def test_mpich_pmi():
    env = discover_env({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MASTER_ADDR": "a",
                        "MASTER_PORT": "2"})
    assert env == LaunchEnv(3, 4, 0, "a", 2, "mpi")


@pytest.mark.parametrize("bad,match", [
    ({"OMPI_COMM_WORLD_RANK": "1"}, "OMPI_COMM_WORLD_SIZE"),
    ({"PMI_SIZE": "4"}, "PMI_RANK"),
    ({"RANK": "4", "WORLD_SIZE": "4"}, "inconsistent"),
    ({"RANK": "x", "WORLD_SIZE": "4"}, "not an integer"),
])
def test_bad_environments(bad, match):
    with pytest.raises(LaunchError, match=match):
        discover_env(bad)


def _init_in_subprocess(env: dict[str, str], code: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_")) and k not in
            ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-c", code], env={**base, **env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_init_distributed_each_environment():
    """A real init_distributed per launcher environment, world 1 so no peer is needed: source, backend,
    timeout honoured; then the errors for a multi-rank environment with nothing to talk to."""
    code = """
import seqpar, torch.distributed as dist
env = seqpar.init_distributed('gloo', timeout=7)
print(env.source if env else None, dist.get_world_size(), dist.get_backend())
seqpar.init_distributed()  # idempotent
"""
    for env, source in [({"RANK": "0", "WORLD_SIZE": "1"}, "torchrun"),
                        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0",
                          "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "5"}, "slurm"),
                        ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"}, "mpi"),
                        ({}, "None")]:
        r = _init_in_subprocess(env, code)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[:3] == [source, "1", "gloo"], r.stdout


def test_init_distributed_multi_rank_tcp_rendezvous():
    """SLURM-style env for a 2-rank world, both ranks in subprocesses: tcp rendezvous at the derived
    address/port; an all_reduce proves they met."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = """
import torch, seqpar, torch.distributed as dist
env = seqpar.init_distributed(timeout=60)
t = torch.ones(1) * (dist.get_rank() + 1)
dist.all_reduce(t)
print(env.source, env.rank, env.master_addr, int(t.item()))
dist.destroy_process_group()
"""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "OMPI_", "PMI_")) and k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True,
                              env={**base, "OMP_NUM_THREADS": "1", "SLURM_PROCID": str(r), "SLURM_NTASKS": "2",
                                   "SLURM_LOCALID": str(r), "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "1",
                                   "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": str(port),
                                   "PATH": os.path.dirname(sys.executable)})
             for r in range(2)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err
        outs.append(out.split())
    assert outs == [["slurm", "0", "localhost", "3"], ["slurm", "1", "localhost", "3"]]


def test_init_distributed_errors_name_the_fix():
    r = _init_in_subprocess({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "9",
                             "SLURM_JOB_NODELIST": "n1"}, "import seqpar; seqpar.init_distributed()")
    assert r.returncode != 0 and "LaunchError" in r.stderr and "srun" in r.stderr, r.stderr
    r = _init_in_subprocess({"WORLD_SIZE": "4"}, "import seqpar; seqpar.init_distributed()")
    assert r.returncode != 0 and "RANK" in r.stderr, r.stderr
    r = _init_in_subprocess({}, "import seqpar; seqpar.init_distributed(backend=3)")
    assert r.returncode != 0 and "TypeError" in r.stderr, r.stderr


def test_cuda_device_from_local_rank(monkeypatch):
    """On CUDA the device is chosen by local rank (modulo the visible devices); faked here."""
    import torch
    import torch.distributed as dist

    import seqpar.launcher as D

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    seen = {}
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    D.init_distributed(environ={"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "6", "MASTER_ADDR": "h",
                                "MASTER_PORT": "1"}, timeout=3)
    assert chosen == [2] and seen["backend"] == "nccl" and seen["timeout"].total_seconds() == 3
    assert seen["init_method"] == "tcp://h:1"
    chosen.clear()
    D.init_distributed("gloo", environ={"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert chosen == [] and seen["backend"] == "gloo"
