"""benchmarks/million.py's --compare path, tiny: under torchrun on 2 CPU ranks, a Mistral (sliding window)
training step with the chunked loss, tiled MLP and checkpointing on equals both references (loss and every
gradient, the script's own bounds): the step with them off, and that step with the model's own loss on the
whole logits computed one rank at a time (``--reference both``; the two references equal each other); the
features observed in effect, one log line at start and end (rank 0), JSON written. The million-token run
itself is the benchmark (README)."""

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
           os.path.join(ROOT, "benchmarks", "million.py"), *TINY, "--compare", "--reference", "both", "--timeout", "150",
           "--json", str(out_json)]
    out = procs.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=180)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    data = json.loads(out_json.read_text())
    checks = {(c["run"], c["against"]): c for c in data["compare"]}
    assert set(checks) == {("on", "reference"), ("on", "off"), ("reference", "off")}
    for c in checks.values():
        assert c["ok"] and c["loss_rel"] < 1e-5 and c["grad_rel_max"] < 1e-4 and c["params"] == 21
    # the same arithmetic on the same logits (transformers' loss on the whole logits), only taken in turns
    assert checks["reference", "off"]["loss_rel"] < 1e-12 and checks["reference", "off"]["grad_rel_max"] < 1e-12
    rows = {r["features"]: r for r in data["rows"]}
    on, off, ref = rows["on"], rows["off"], rows["reference"]
    assert on["chunked_loss"] and on["tiled_mlps"] == 2
    for r in (off, ref):
        assert not r["chunked_loss"] and r["tiled_mlps"] == 0 and r["loss"] == pytest.approx(on["loss"], rel=1e-5)
    for r in (on, off, ref):  # a measured peak
        assert r["rise_bytes"] > 0 and r["peak_bytes"] > r["rise_bytes"]
    assert on["predicted_rise_bytes"] > 0 and off["predicted_rise_bytes"] > 0  # and the plan beside it
    assert ref["predicted_rise_bytes"] is None  # the reference's memory is not the plain step's
    assert out.stdout.count("million start:") == 1 and out.stdout.count("million end:") == 1
    assert "compare OK" in out.stdout
    assert (tmp_path / "million.png").stat().st_size > 1000 or "matplotlib not installed" in out.stdout
