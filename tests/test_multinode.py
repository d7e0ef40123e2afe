"""Two simulated hosts on one machine: two network namespaces joined by a veth pair, each with its own
hostname (UTS namespace) and /etc/hosts, run a 2-node torchrun with c10d rendezvous on the first
"host"; the ranks run the equivalence subset of launch/check.py over gloo across the veth link.
Only the namespaces' own addresses are used; everything is removed afterwards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from seqpar.testing import processes as launcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@pytest.fixture
def two_hosts():
    """[(namespace, hostname, address)] x 2 on a private /24; torn down afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.skip("needs root, iproute2 (ip netns) and util-linux (unshare)")
    tag = os.getpid() % 10000
    subnet = f"10.{200 + tag % 50}.{tag % 250}"
    hosts = [(f"seqpar-a{tag}", "node-a", f"{subnet}.1"), (f"seqpar-b{tag}", "node-b", f"{subnet}.2")]
    hosts_file = "127.0.0.1 localhost\n" + "".join(f"{addr} {name}\n" for _, name, addr in hosts)
    try:
        for ns, _, _ in hosts:
            r = _ip("netns", "add", ns, check=False)
            if r.returncode:
                pytest.skip(f"network namespaces unavailable here: {r.stderr.strip()}")
            os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
            with open(f"/etc/netns/{ns}/hosts", "w") as f:  # ip netns exec bind-mounts it on /etc/hosts
                f.write(hosts_file)
        (a, _, _), (b, _, _) = hosts
        _ip("link", "add", f"va{tag}", "netns", a, "type", "veth", "peer", "name", f"vb{tag}", "netns", b)
        for (ns, _, addr), dev in zip(hosts, (f"va{tag}", f"vb{tag}")):
            _ip("-n", ns, "link", "set", dev, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", "eth0", "up")
        yield hosts
    finally:
        for ns, _, _ in hosts:
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


def test_two_node_torchrun_c10d(two_hosts):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PATH=BIN + os.pathsep + env["PATH"])
    head = two_hosts[0][1]
    procs = []
    for node_rank, (ns, hostname, _) in enumerate(two_hosts):
        torchrun = (f"exec {BIN}/torchrun --nnodes 2 --nproc-per-node 1 --node-rank {node_rank} "
                    f"--rdzv-backend c10d --rdzv-id seqpar-mn --rdzv-endpoint {head}:29511 --max-restarts 0 "
                    f"launch/check.py --timeout 60")
        cmd = ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", f"hostname {hostname} && {torchrun}"]
        procs.append(launcher.popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=150)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                launcher.kill_group(q)
            pytest.fail("2-node torchrun hung (150 s)")
    for p, out in zip(procs, outs):
        assert p.returncode == 0, "\n----\n".join(outs)
    assert "SEQPAR-CHECK OK source=torchrun world=2 hosts=node-a,node-b" in outs[0] + outs[1], "\n----\n".join(outs)
