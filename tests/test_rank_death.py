"""A rank that dies in the middle of a ring ends the job under every launcher, with no orphaned rank.

launch/die.py runs causal zigzag ring attention (forward + backward) in a loop on every rank; in call
#2 (the third), rank 1 SIGKILLs itself right after the kernels of backward ring step 1, while the dK/dV buffer
(and for P > 2 the next K/V block) is in flight. Under torchrun, mpirun (gloo, and seqpar.MPIGroup),
srun and sbatch (launch/slurm/srun.sbatch) on the one-node SLURM cluster (launch/local_cluster.sh,
root only, like tests/test_slurm.py), each case checks that

- the launcher exits non-zero, well before the payload's own timeout (``TIMEOUT``): the job ended
  because of the death, not because the other ranks waited it out;
- every rank that started (each appends its PID and start time to the event file) is gone once the
  launcher has exited (a zombie or a recycled PID counts as gone);

and prints the time from the victim's death to the launcher's exit and what the other ranks saw.
With ``SEQPAR_RECORD_RESULTS=1`` the measurements also go to benchmarks/results/reliability_launchers.json
(kept per case: the last 5 samples and their median), never otherwise.

Every launcher runs in its own process group with a timeout (seqpar.testing.processes); SLURM's
ranks are slurmstepd's children, so a timed-out SLURM case is also scancel-ed by job name.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

from seqpar.testing import processes as procs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAYLOAD = os.path.join(ROOT, "launch", "die.py")
RESULTS = os.path.join(ROOT, "benchmarks", "results", "reliability_launchers.json")

TIMEOUT = 30  # s: the payload's init_distributed / MPIGroup timeout (rendezvous, every ring wait)
START = 90  # s: allowance for start-up (imports, rendezvous, first calls) on a loaded 2-core machine
GRACE = 3.0  # s: how long after the launcher's exit a rank may take to disappear
VICTIM, AT_CALL, PHASE, STEP = 1, 2, "backward", 1


def _payload_args(stamp: str, transport: str = "gloo") -> list[str]:
    return [PAYLOAD, "--stamp", stamp, "--timeout", str(TIMEOUT), "--victim", str(VICTIM), "--at-call",
            str(AT_CALL), "--phase", PHASE, "--step", str(STEP), "--transport", transport]


# --- processes ---------------------------------------------------------------------------------------

def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start ticks) of a live or zombie process, None when there is none with this PID."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[19])


def _alive(rank: dict) -> bool:
    """The rank's process still runs: it exists, is not a zombie, and is not a later process that
    reuses the PID (a different start time)."""
    st = _stat(rank["pid"])
    return st is not None and st[0] not in ("Z", "X") and st[1] == rank["start_ticks"]


def _kill_leftovers(ranks: list[dict]) -> None:
    for r in ranks:
        if _alive(r):
            try:
                os.kill(r["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


def _events(stamp: str) -> list[dict]:
    if not os.path.exists(stamp):
        return []
    with open(stamp) as f:
        return [json.loads(line) for line in f if line.strip()]


def _run(cmd, *, env, tmp, n: int, on_timeout=None) -> dict:
    """Run the launcher ``cmd`` (its output in a file, so a rank that outlives the launcher cannot hold
    a pipe open), wait for its exit, then check the ranks; -> the case's measurements."""
    stamp = str(tmp / "events.jsonl")
    out_path = tmp / "launcher.out"
    cmd = [c.replace("{stamp}", stamp) for c in cmd]
    with open(out_path, "w") as out:
        p = procs.popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    t_start = time.time()
    try:
        rc = p.wait(timeout=START + TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        procs.kill_group(p)
        if on_timeout is not None:
            on_timeout()
        _kill_leftovers([e for e in _events(stamp) if e["event"] == "start"])
        pytest.fail(f"{cmd[0]} did not exit in {START + TIMEOUT + 30} s:\n{out_path.read_text()[-4000:]}")
    t_exit = time.time()
    ranks = [e for e in _events(stamp) if e["event"] == "start"]
    alive_at_exit = [r["rank"] for r in ranks if _alive(r)]
    deadline = t_exit + GRACE
    while any(_alive(r) for r in ranks) and time.time() < deadline:
        time.sleep(0.05)
    left = [r for r in ranks if _alive(r)]
    t_gone = time.time() if not left else None
    _kill_leftovers(left)
    output = out_path.read_text(errors="replace")
    events = _events(stamp)
    kills = [e for e in events if e["event"] == "kill"]
    assert len(ranks) == n, f"{len(ranks)} of {n} ranks started:\n{output[-4000:]}"
    assert kills and kills[0]["rank"] == VICTIM and kills[0]["call"] == AT_CALL, \
        f"the victim did not die where asked (the job failed otherwise?):\n{output[-4000:]}"
    t_kill = kills[0]["time"]
    errors = {e["rank"]: e for e in events if e["event"] == "error"}
    return dict(
        rc=rc,
        n=n,
        time_to_exit_s=round(t_exit - t_kill, 3),
        wall_s=round(t_exit - t_start, 2),
        ranks_alive_at_exit=alive_at_exit,
        ranks_alive_after_grace=[r["rank"] for r in left],
        last_rank_gone_s=None if t_gone is None else round(max(t_exit, t_gone) - t_kill, 3),
        survivor_errors={str(r): dict(error=e["type"], reason=_reason(e), after_s=round(e["time"] - t_kill, 3))
                         for r, e in sorted(errors.items())},
        survivors_without_error=[r["rank"] for r in ranks if r["rank"] != VICTIM and r["rank"] not in errors],
        sigterm_dumps=output.count("Stack (most recent call first)"),  # faulthandler: a rank got SIGTERM
        output=output,
    )


def _reason(error: dict) -> str:
    """The transport's reason for a survivor's error (gloo's 'Connection closed by peer', a timeout, ...)."""
    text = f"{error.get('cause') or ''} {error['message']}"
    for reason in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out",
                   "timeout"):
        if reason in text:
            return reason
    return (error.get("cause") or error["message"])[:200]


# --- results -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def results():
    """Measurements of this module's cases; written to RESULTS at the end with SEQPAR_RECORD_RESULTS=1."""
    found: dict[str, dict] = {}
    yield found
    if os.environ.get("SEQPAR_RECORD_RESULTS") != "1" or not found:
        return
    data = {}
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            data = json.load(f)
    cases = data.setdefault("cases", {})
    for key, m in found.items():
        old = cases.get(key, {})
        samples = (old.get("time_to_exit_samples_s", []) + [m["time_to_exit_s"]])[-5:]
        cases[key] = {k: v for k, v in m.items() if k != "output"} | dict(
            time_to_exit_samples_s=samples, time_to_exit_median_s=round(statistics.median(samples), 3))
    data["what"] = (f"launch/die.py: rank {VICTIM} SIGKILLs itself in call #{AT_CALL}, {PHASE} ring step {STEP} "
                    f"(blocks in flight); time_to_exit_s = the launcher's exit - the victim's last timestamp; "
                    f"measured by tests/test_rank_death.py")
    data["machine"] = f"{os.cpu_count()} cores, CPU ranks, OMP_NUM_THREADS=1"
    data.setdefault("loadavg_1min_per_run", []).append(round(os.getloadavg()[0], 1))
    data["loadavg_1min_per_run"] = data["loadavg_1min_per_run"][-5:]
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")


def _check(key: str, m: dict, results: dict) -> None:
    summary = {k: v for k, v in m.items() if k != "output"}
    print(f"\nrank-death {key}: {json.dumps(summary)}")
    results[key] = m
    out = m["output"][-4000:]
    assert m["rc"] != 0, f"{key}: the launcher exited 0 although rank {VICTIM} died:\n{out}"
    assert m["time_to_exit_s"] < TIMEOUT, (
        f"{key}: the launcher exited {m['time_to_exit_s']} s after the death, not before the payload's "
        f"{TIMEOUT} s timeout: the survivors waited it out instead of ending on the death\n{out}")
    assert not m["ranks_alive_after_grace"], \
        f"{key}: rank(s) {m['ranks_alive_after_grace']} outlived the launcher by {GRACE} s (orphans)\n{out}"


# --- torchrun, mpirun --------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 4])
def test_torchrun(n, tmp_path, results):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           *_payload_args("{stamp}")]
    _check(f"torchrun n={n}", _run(cmd, env=procs.launcher_env(), tmp=tmp_path, n=n), results)


@pytest.mark.parametrize("n,transport", [(2, "gloo"), (2, "mpi")])
def test_mpirun(n, transport, tmp_path, results, mpirun):
    cmd = [*mpirun(n), sys.executable, *_payload_args("{stamp}", transport)]
    _check(f"mpirun n={n} {transport}", _run(cmd, env=procs.launcher_env(), tmp=tmp_path, n=n), results)


# --- SLURM -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("via", ["srun", "sbatch"])
def test_slurm(via, slurm, tmp_path, results):
    """srun -n 2 --kill-on-bad-exit=1 by hand, and sbatch --wait of launch/slurm/srun.sbatch (which
    runs that srun line); the ranks are plain python processes started by slurmstepd."""
    n, name = 2, f"seqpar-die-{os.getpid()}-{via}"
    env = {**procs.launcher_env(), "SLURM_CONF": slurm, "PYTHON": sys.executable}
    if via == "srun":
        cmd = ["srun", "-n", str(n), f"--job-name={name}", "--kill-on-bad-exit=1", sys.executable,
               *_payload_args("{stamp}")]
    else:
        cmd = ["sbatch", "--wait", "--parsable", f"--job-name={name}", f"--ntasks={n}",
               f"--output={tmp_path / 'job.out'}", os.path.join(ROOT, "launch", "slurm", "srun.sbatch"),
               *_payload_args("{stamp}")]

    def cancel():
        subprocess.run(["scancel", "--quiet", "-n", name], env=env, capture_output=True, timeout=30)

    m = _run(cmd, env=env, tmp=tmp_path, n=n, on_timeout=cancel)
    if via == "sbatch":
        job_out = tmp_path / "job.out"
        m["output"] += "\n[job output]\n" + (job_out.read_text(errors="replace") if job_out.exists() else "")
        m["sigterm_dumps"] = m["output"].count("Stack (most recent call first)")
    _check(f"{via} n={n}", m, results)
