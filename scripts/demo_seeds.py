"""The demo's recipe on fresh seeds: `cultvlm demo` with seeds 1-5 (never used while the recipe
was chosen -- that was seed 0's validation split), each in its own folder, then every threshold's
figure per seed, the mean over the seeds with a Student-t 95% interval, and the pooled figure.

    python scripts/demo_seeds.py --out demo-seeds            # ~75 min on 2 cores
    python scripts/demo_seeds.py --out demo-seeds --seeds 1 2 # a subset

Resumable: a seed whose folder holds a finished demo is read, not re-run (run_demo skips finished
steps). Writes <out>/seeds.json (and prints it as a table); docs/demo_seeds.json is its committed copy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mlx_cultvlm.cli import main as cultvlm
from mlx_cultvlm.demo import THRESHOLDS, measure, run_demo
from mlx_cultvlm.metrics import summarize
from mlx_cultvlm.files import write_json
from mlx_cultvlm.report import fig_text, pct

FRESH_SEEDS = [1, 2, 3, 4, 5]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=FRESH_SEEDS)
    args = parser.parse_args(argv)
    if 0 in args.seeds:
        parser.error("seed 0 chose the recipe (its validation split): it is not a fresh seed")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    seeds = {}
    for seed in args.seeds:
        folder = out / f"seed-{seed}"
        print(f"\n=== seed {seed}: {folder} ===", flush=True)
        started = time.perf_counter()
        passed = run_demo(cultvlm, folder, seed=seed)
        seconds = time.perf_counter() - started
        timing = folder / "seconds.json"  # the first (complete) run's time; a resumed run keeps it
        if not timing.is_file():
            write_json(timing, {"seconds": seconds})
        seeds[seed] = {"passed": passed, "seconds": json.loads(timing.read_text())["seconds"],
                       "figures": measure(folder / "runs")}
    rows = {}
    for what, run, key, direction, value in THRESHOLDS:
        figures = [s["figures"][run][key] for s in seeds.values()]
        rows[f"{run}: {key}"] = {"what": what, "needs": f"{direction} {value}", **summarize(figures),
                                 "per_seed": {seed: s["figures"][run][key] for seed, s in seeds.items()}}
    for run in ("base-new-design", "tuned-new-design"):
        figures = [s["figures"][run]["targets"] for s in seeds.values() if run in s["figures"]]
        if figures:
            rows[f"{run}: targets"] = {"what": f"{run.split('-')[0]} model names the targets in the held-out design",
                                       "needs": None, **summarize(figures),
                                       "per_seed": {seed: s["figures"][run]["targets"] for seed, s in seeds.items()}}
    result = {"seeds": list(seeds), "passed": {seed: s["passed"] for seed, s in seeds.items()},
              "minutes": {seed: round(s["seconds"] / 60, 1) for seed, s in seeds.items()}, "figures": rows}
    write_json(out / "seeds.json", result)
    print(f"\nfresh seeds {', '.join(map(str, seeds))}: mean over seeds [Student-t 95%]; per seed k/n = share")
    for key, row in rows.items():
        mean = f"{pct(row['mean'])}" + (f" [{100 * row['t_ci95'][0]:.1f}, {100 * row['t_ci95'][1]:.1f}]"
                                       if row.get("t_ci95") else "")
        print(f"  {row['what']} (needs {row['needs'] or 'no threshold'}): mean {mean}")
        for seed, fig in row["per_seed"].items():
            print(f"      seed {seed}: {fig_text(fig)}")
    print(f"  minutes per seed: {result['minutes']}; every threshold met on seeds "
          f"{[s for s, ok in result['passed'].items() if ok] or 'none'}")
    print(f"written to {out / 'seeds.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
