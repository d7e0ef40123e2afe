"""Run a launcher (torchrun, mpirun, ...) in its own process group, so a timeout kills the whole
job — the launcher *and* the ranks it started — instead of leaving orphaned ranks behind.

Killing the group is not enough on its own: torchrun (torch >= 2.13) starts each rank in a session of
its own, outside the launcher's group. :func:`kill_group` therefore kills every descendant of the
launcher found in ``/proc`` (and each one's group) before the launcher's group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

_LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_")
_LAUNCHER_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launcher_env(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher's variables (so a launcher started from a test
    sets its own), one thread per rank, this interpreter's bin folder (mpirun, torchrun) first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES) and k not in _LAUNCHER_NAMES}
    env.update(OMP_NUM_THREADS="1", PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    env.update(extra)
    return env

__all__ = ["run", "kill_group", "popen", "descendants", "launcher_env"]


def popen(cmd, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(cmd, start_new_session=True, **kwargs)


def descendants(pid: int) -> list[int]:
    """The pids of every live descendant of ``pid`` (children first), read from ``/proc``; [] elsewhere."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # after "pid (comm) state"
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_group(p: subprocess.Popen) -> None:
    """SIGKILL ``p``'s descendants (each with its own process group: ranks a launcher put in sessions
    of their own) and ``p``'s process group, then reap ``p``."""
    for pid in descendants(p.pid):
        for kill in (lambda: os.killpg(os.getpgid(pid), signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def run(cmd, *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Like ``subprocess.run(cmd, capture_output=True, text=True, timeout=...)``; on timeout the whole
    process group is killed and ``subprocess.TimeoutExpired`` (with the output so far) is raised."""
    p = popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(p)
        out, err = p.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    finally:
        if p.poll() is None:
            kill_group(p)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)
