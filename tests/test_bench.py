"""The device check runs end to end at toy sizes on a CPU (bench/gpu.sh --cpu-smoke), so GPU time is not
spent finding a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_cpu_smoke_runs_every_part(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--cpu-smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_cpu_smoke.json").read_text())
    assert results["sizes"] == "cpu-smoke"
    for part in ("train", "dp", "compare", "launch"):
        assert "error" not in results[part], results[part].get("error")
    for mode in ("eager", "compiled"):
        row = results["train"][mode]
        assert row["goldenpath_tokens_per_s"] > 0 and row["plain_tokens_per_s"] > 0
    for model in ("gpt2-small", "resnet18"):
        row = results["dp"][model]
        assert {"non-private", "dp-fast", "opacus-hooks"} <= set(row)
        assert row["non-private"]["x_non_private"] == 1.0
    # Opacus' ghost clipping refuses GPT-2's tied embeddings: recorded as not run, not as a crash
    assert "opacus-ghost" in results["dp"]["resnet18"]
    assert "opacus-ghost" in results["dp"]["gpt2-small"]["not_run"]
    assert results["compare"]["4"]["ratio"] > 1.0  # compare does the forwards and more
    launch = results["launch"]
    assert launch["ok"] and launch["processes"] == 2 and launch["replicas_in_sync"] is True
    table = (tmp_path / "gpu_cpu_smoke.md").read_text()
    assert "accelerate launch (2 proc.)" in table and "FAILED" not in table
