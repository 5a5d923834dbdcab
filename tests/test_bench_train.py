"""scripts/bench_train.py end to end at toy size: both trainers run the same steps over the same
samples and tokens, and the JSON line has every figure the benchmark reports."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_train_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--models", "tiny", "--per-entity", "1",
         "--valid-per-entity", "1", "--batch-size", "2", "--epochs", "2", "--image-side", "56",
         "--work-dir", str(tmp_path / "work"), "--save", str(out)],
        capture_output=True, text=True, timeout=300, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert json.loads(out.read_text()) == json.loads(line)
    tiny = json.loads(line)["tiny"]
    ours, theirs, nocache = tiny["cultvlm"], tiny["mlx_vlm"], tiny["cultvlm_no_feature_cache"]
    for run in (ours, theirs, nocache):
        assert run["steps"] == 4 and run["sequences"] == 8
        assert run["tokens_per_s"] > 0 and run["peak_memory_gb"] > 0 and len(run["epoch_tokens_per_s"]) == 2
    assert ours["tokens"] == theirs["tokens"] > 0 and ours["logged_tokens_match"]
    checks = tiny["checks"]
    assert checks["identical_input_ids"] and checks["image_tokens_per_sample"] == [4]
    parity = checks["same_loss_and_grads_on_one_batch"]
    assert abs(parity["loss_cultvlm"] - parity["loss_mlx_vlm"]) < 1e-4 and parity["grad_rel_diff"] < 1e-4
    assert tiny["feature_cache"]["same_loss_as_no_cache"]
    assert set(tiny["ratios"]) >= {"tokens_per_s", "peak_memory"} and set(tiny["targets_met"]) == {
        "tokens_per_s_ratio_ge_1.2", "peak_memory_ratio_le_1.0", "losses_comparable"}
