"""benchmarks/million.py's --compare path, tiny: under torchrun on 2 CPU ranks, a Mistral (sliding window)
training step with the chunked loss, tiled MLP and checkpointing on equals the same step with them off
(loss and every gradient, the script's own bounds), the features observed in effect, one log line at
start and end (rank 0), JSON written. The million-token run itself is the benchmark (README)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from seqpar.testing import processes as procs

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--seq", "2048", "--vocab", "512", "--hidden", "64", "--intermediate", "128", "--heads", "4",
        "--kv-heads", "1", "--window", "96", "--layers", "2"]


def test_compare_tiny(tmp_path):
    out_json = tmp_path / "million.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "benchmarks", "million.py"), *TINY, "--compare", "--timeout", "150",
           "--json", str(out_json)]
    out = procs.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=180)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    data = json.loads(out_json.read_text())
    (c,) = data["compare"]
    assert c["ok"] and c["loss_rel"] < 1e-5 and c["grad_rel_max"] < 1e-4 and c["params"] == 21
    on, off = sorted(data["rows"], key=lambda r: r["features"] != "on")
    assert on["chunked_loss"] and on["tiled_mlps"] == 2 and not off["chunked_loss"] and off["tiled_mlps"] == 0
    assert on["loss"] == pytest.approx(off["loss"], rel=1e-5)
    for r in (on, off):  # a measured peak and a prediction beside it
        assert r["rise_bytes"] > 0 and r["peak_bytes"] > r["rise_bytes"] and r["predicted_rise_bytes"] > 0
    assert out.stdout.count("million start:") == 1 and out.stdout.count("million end:") == 1
    assert "compare OK" in out.stdout
    assert (tmp_path / "million.png").stat().st_size > 1000 or "matplotlib not installed" in out.stdout
