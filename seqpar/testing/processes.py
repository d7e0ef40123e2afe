"""Run a launcher (torchrun, mpirun, ...) in its own process group, so a timeout kills the whole
job — the launcher *and* the ranks it started — instead of leaving orphaned ranks behind."""

from __future__ import annotations

import os
import signal
import subprocess

__all__ = ["run", "kill_group", "popen"]


def popen(cmd, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(cmd, start_new_session=True, **kwargs)


def kill_group(p: subprocess.Popen) -> None:
    """SIGKILL every process of ``p``'s process group (its session), then reap ``p``."""
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
