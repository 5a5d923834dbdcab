"""scripts/bench_eval.py end to end at toy size: every path answers every item, the answers of
all paths are identical, and the JSON line has every figure the benchmark reports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_cultvlm.evaluate import cpu_cores

ROOT = Path(__file__).resolve().parent.parent


def test_bench_eval_smoke():
    env = {k: v for k, v in os.environ.items() if k != "MLX_BFS_MAX_WIDTH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_eval.py"), "--items", "10", "--batch-size", "10",
         "--max-tokens", "3", "--repeats", "1"],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["items"] == 10 and result["cpu_cores"] == cpu_cores()
    on_cpu = mx.default_device() == mx.cpu
    assert result["mlx_bfs_max_width"] == (str(100 * cpu_cores()) if on_cpu else None)  # as eval sets it
    for name in ("demo_base", "tiny", "mid"):
        model = result[name]
        assert model["identical_answers"] and model["identical_count"] == 10, (name, model)
        assert all(len(model["seconds"][path]) == 1 for path in ("one_by_one", "batched_one_core", "batched"))
        seconds = {path: model["seconds"][path][0] for path in model["seconds"]}
        assert model["speedup"] == pytest.approx(seconds["one_by_one"] / seconds["batched"])
        assert model["batched_items_per_s"] == pytest.approx(10 / seconds["batched"])
        assert model["mean_answer_chars"] > 0
