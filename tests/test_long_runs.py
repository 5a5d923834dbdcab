"""Long runs keep their memory flat: an evaluation of 2,000 items and a training of 500 steps
on the tiny model, run as the real command line, with the process's resident memory (VmRSS)
and MLX's active and cache memory sampled every 0.2 s from inside the process (LAUNCHER in
test_crash.py).

What is compared: the median of each quantity over the first and the last third of the work
(by time, from the first item or step to the end; the throughput is steady, so these are
thirds of the work too). A leak of only 10 KB per item or step would add 20 MB over 2,000 items
and 5 MB over 500 steps. The bounds leave room for the allocator's noise (RSS moves by a few
MB as Python and MLX reuse freed memory) and fail on any steady per-item growth of that order;
the measured numbers are printed (pytest -s).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

from mlx_cultvlm.data.catalog import load_catalog
from mlx_cultvlm.evaluate import items_from_dataset
from synthetic import ENTITIES, draw, sample
from test_crash import CATALOG, Child, lines_of, no_child_left_behind  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

MB = 1 << 20


def run_sampled(args, cwd: Path, progress_file: Path):
    """Run the command line to the end with its memory sampled; returns the samples
    (time, rss, active, cache) taken between the first unit of work and the end, and the
    number of units (lines of progress_file)."""
    memory_log = cwd / "memory.log"
    child = Child(args, cwd, memory_log=memory_log)
    assert child.wait_for(lambda: progress_file.exists() and len(lines_of(progress_file)[0]) > 0,
                          timeout=600, poll=0.05)
    first = time.time()
    child.finish(timeout=900)
    samples = np.array([[float(v) for v in line.split()] for line in memory_log.read_text().splitlines()
                        if len(line.split()) == 4])
    return samples[samples[:, 0] >= first], len(lines_of(progress_file)[0])


def growth(samples: np.ndarray, what: str) -> dict:
    """Median of each quantity over the first and last third of the samples, in MB."""
    assert len(samples) >= 30, f"only {len(samples)} memory samples"
    third = len(samples) // 3
    first, last = samples[:third], samples[-third:]
    report = {"samples": len(samples), "seconds": round(float(samples[-1, 0] - samples[0, 0]), 1)}
    for column, name in ((1, "rss"), (2, "active"), (3, "cache")):
        a, b = np.median(first[:, column]) / MB, np.median(last[:, column]) / MB
        report[name] = {"first_third": round(a, 2), "last_third": round(b, 2), "growth": round(b - a, 2),
                        "max": round(float(samples[:, column].max()) / MB, 2)}
    # The slope of RSS over the run (least squares), as MB per minute.
    t = samples[:, 0] - samples[0, 0]
    report["rss"]["slope_mb_per_min"] = round(float(np.polyfit(t, samples[:, 1] / MB, 1)[0] * 60), 2)
    print(f"\n{what}: {json.dumps(report)}")
    return report


def test_evaluating_2000_items_keeps_memory_flat(tiny_4bit, tmp_path):
    # 200 distinct 56x56 pictures (4 image tokens each) of the four synthetic entities: ~10 items each.
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rng, rows = np.random.default_rng(1), []
    for i in range(200):
        name, shape, colour, background = ENTITIES[i % 4]
        image = draw(shape, colour, background, rng, size=56)
        image.putpixel((0, 0), (i % 256, i // 256, 7))  # no two alike
        rel = f"images/{i:03d}.png"
        image.save(data / rel)
        rows.append(sample(rel, name, hashlib.sha256((data / rel).read_bytes()).hexdigest()))
    (data / "test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                     encoding="utf-8")
    out = tmp_path / "run"
    samples, items = run_sampled(["eval", "--model", tiny_4bit, "--data", data, "--out", out, "--catalog", CATALOG,
                                  "--max-tokens", 4, "--max-pixels", 56 * 56, "--batch-size", 16],
                                 tmp_path, out / "predictions.jsonl")
    assert items == len(items_from_dataset(data, "test", load_catalog(CATALOG))) > 1900
    report = growth(samples, f"eval of {items} items")
    assert report["rss"]["growth"] < max(30.0, 0.05 * report["rss"]["first_third"]), report
    assert report["active"]["growth"] < 5.0, report


def test_training_500_steps_keeps_memory_flat(tiny_4bit, dataset, tmp_path):
    root, _ = dataset
    out = tmp_path / "adapters"
    config = tmp_path / "run.yaml"
    config.write_text("save_every: 250\nval_every: 250\n", encoding="utf-8")
    samples, steps = run_sampled(["lora", "--config", config, "--model", tiny_4bit, "--data", root, "--out", out,
                                  "--steps", 500, "--batch-size", 1, "--rank", 8, "--max-pixels", 56 * 56,
                                  "--dropout", 0.05, "--learning-rate", "1e-4"],
                                 tmp_path, out / "train_log.jsonl")
    assert steps == 500
    report = growth(samples, f"training of {steps} steps")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    peak = [e["peak_memory_gb"] * 1024 for e in log]  # GiB to MiB
    print(f"MLX peak memory (train_log): step 1 {peak[0]:.2f} MiB, step 250 {peak[249]:.2f} MiB, "
          f"step 500 {peak[-1]:.2f} MiB")
    assert report["rss"]["growth"] < max(20.0, 0.05 * report["rss"]["first_third"]), report
    assert report["active"]["growth"] < 2.0, report
    assert peak[-1] <= 1.5 * peak[len(peak) // 3]  # the peak does not creep up either
