"""Runs tests/triton_cases.py once per pytest process in a fresh interpreter with TRITON_INTERPRET=1.

The variable must be set before triton is imported, and the pytest process may already have imported
it (torch, transformers), so the interpreter cases run in a subprocess; the tests assert on its JSON.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile

__all__ = ["interpret_results"]

HERE = os.path.dirname(os.path.abspath(__file__))


@functools.cache
def interpret_results(timeout: float = 600.0) -> dict:
    """The JSON of ``TRITON_INTERPRET=1 python tests/triton_cases.py``; raises with its stderr on failure."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="seqpar-triton-") as d:
        path = os.path.join(d, "results.json")
        proc = subprocess.run([sys.executable, os.path.join(HERE, "triton_cases.py"), path], env=env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(path):
            raise RuntimeError(f"triton_cases.py failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}")
        with open(path) as f:
            return json.load(f)
