"""`cultvlm demo`: the whole story offline, on procedurally drawn characters.

A base model that knows three control characters (the stand-in for a real Qwen2.5-VL that knows
Mickey Mouse) is taught six new ones through the same commands a user runs:

    data check -> data caption --provider offline -> data build -> eval (base) -> lora -> fuse
    -> eval (tuned) -> compare

then the measured figures are held to the thresholds below. A missed threshold is reported as
such and the demo exits non-zero: it never claims what it did not measure.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import click

from .errors import CultvlmError
from .metrics import naming
from .tiny import TinySpec

IMAGE_SIZE = 168  # px: 12x12 patches, 36 image tokens per picture
# The demo's base: a wider, deeper vision tower than the test model (it must tell look-alike
# characters apart); one attention window covers the whole picture.
DEMO_SPEC = TinySpec(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                     mrope_section=[4, 6, 6], vision_depth=4, vision_hidden_size=128, vision_heads=2,
                     vision_intermediate_size=256, fullatt_block_indexes=[3], window_size=IMAGE_SIZE)
# The larger base of experiments/tiny-offline.yaml (the stand-in for 7B next to the demo base's
# 3B): the same vision tower, a language model with twice the layers and twice the MLP width.
LARGE_SPEC = replace(DEMO_SPEC, num_hidden_layers=4, intermediate_size=512)
VISION_SEED_OFFSET = 7919  # pictures for vision pre-training come from seeds the demo data never uses
BASE_IMAGES_SEED = 7920  # the base's language stage draws its pictures from this seed
BASE_DIR = Path(__file__).resolve().parent.parent / "data" / "demo_base"
LARGE_BASE_DIR = BASE_DIR.with_name("demo_base_large")

# Pictures per character in the demo's own data set (split by `data build` into train/valid/test:
# 52/12/16). 40 gave the same accuracy within a few items, on half the test items. "negative":
# per character the catalog does not have (characters.STRANGERS), the out-of-catalog pictures.
PICTURES = {"target": 80, "control": 80, "negative": 80}
# Trained on the fact lines ("Это Чебурашка. Его придумал Эдуард Успенский.": the name and the
# origin, whatever the question) and the controls' replay. Chosen on seed 0's validation split
# (72 target pictures; docs/EXPERIMENTS.md, "Choosing the recipe"): with every kind of line the
# two-layer language model mixes the answer kinds on held-out phrasings (1,000 steps: targets
# 81.9%, retention 48.5%, fact 0%); [naming, replay] names well but states no fact (0%);
# [fact, replay] at 640 steps: targets 84.7%, retention 80.9%, fact 52.8%, verification 91.7%,
# false positives 64.6% (the tower cannot tell the strangers from some catalog characters:
# scripts/probe_demo_tower.py). No recipe tried meets every threshold.
LORA = {"mix": ["fact", "replay"], "rank": 16, "alpha": 32.0, "dropout": 0.0,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
        "steps": 640, "batch_size": 16, "learning_rate": 2e-3, "warmup_steps": 32, "max_pixels": IMAGE_SIZE ** 2,
        "val_every": 160, "save_every": 160}
# Pictures per character of the held-out design (characters.DESIGNS): asked the naming questions only.
NEW_DESIGN_PICTURES = 16
THRESHOLDS = [  # (what, run, measured figure, at most / at least, value)
    ("base names the targets", "base", "targets", "at most", 0.20),
    ("base names the controls", "base", "controls", "at least", 0.90),
    ("tuned model names the targets", "tuned", "targets", "at least", 0.90),
    ("tuned model keeps the controls (retention)", "tuned", "retention", "at least", 0.90),
    ("tuned model states the targets' work or author (fact)", "tuned", "fact", "at least", 0.80),
    ("tuned model answers is-this-X about the targets (verification)", "tuned", "verify", "at least", 0.85),
    ("tuned model names a target on out-of-catalog pictures (false positives)", "tuned", "false_positives",
     "at most", 0.10),
]


def run_demo(cultvlm: click.Group, out: Path, seed: int = 0, lora_steps: int | None = None,
             pictures: dict | None = None, base_dir: Path = BASE_DIR, split: str = "test",
             recipe: dict | None = None) -> bool:
    """The demo in `out`, its steps run as the command lines a user would type into `cultvlm`
    (the click group, passed in: the command line sits above this module); True when every
    threshold is met. Finished steps are redone only if their output is missing (a second run
    skips to where the first stopped). `split` and `recipe` (LORA's keys to change) are for
    choosing the recipe on the validation split."""
    from . import characters
    from .data.catalog import load_catalog
    from .files import write_json

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    settings = {"seed": seed, "lora_steps": lora_steps, "pictures": pictures, "split": split, "recipe": recipe}
    if (out / "demo.json").is_file() and json.loads((out / "demo.json").read_text()) != settings:
        raise CultvlmError(f"{out}: holds a demo run with other settings "
                           f"({(out / 'demo.json').read_text().strip()}); use another --out or delete it")
    write_json(out / "demo.json", settings)
    if not (base_dir / "demo_base.json").is_file():
        raise CultvlmError(f"{base_dir}: the demo base model is missing; build it with "
                           "`python scripts/build_demo_base.py`")
    catalog = out / "catalog.json"
    catalog.write_text(json.dumps(characters.DEMO_CATALOG, ensure_ascii=False, indent=1), encoding="utf-8")
    load_catalog(catalog)
    images = out / "images"
    counts = pictures or PICTURES
    negatives = out / "negatives"
    if not images.exists():
        click.echo(f"drawing {len(characters.PARTS)} characters into {images} ...")
        for entity in characters.DEMO_CATALOG["entities"]:
            characters.write_images(images, ids=[entity["id"]], per_entity=counts[entity["role"]], seed=seed,
                                    size=IMAGE_SIZE)
    if not negatives.exists():
        click.echo(f"drawing {len(characters.STRANGERS)} characters the catalog does not have into {negatives} ...")
        characters.write_images(negatives, ids=list(characters.STRANGERS), per_entity=counts["negative"],
                                seed=seed, size=IMAGE_SIZE)
    new_design = out / "new_design"
    if not new_design.exists():
        click.echo(f"drawing the held-out design of {len(characters.PARTS)} characters into {new_design} ...")
        characters.write_images(new_design, per_entity=NEW_DESIGN_PICTURES, seed=seed, size=IMAGE_SIZE, design=1)
    lora_yaml = out / "lora.yaml"
    options = dict(LORA, **(recipe or {}))
    ranks = training_ranks()
    # batch_size is per rank: the global batch, and so each step's mean, stays the recipe's.
    options.update(steps=lora_steps or options["steps"], seed=seed, batch_size=options["batch_size"] // ranks)
    lora_yaml.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in options.items()), encoding="utf-8")
    base, data, runs = str(base_dir), str(out / "dataset"), out / "runs"
    common = ["--catalog", str(catalog)]
    steps = [
        (None, ["data", "check", "--images", str(images), "--negatives", str(negatives), *common]),
        (out / "captions.jsonl", ["data", "caption", "--provider", "offline", "--images", str(images), *common,
                                  "--captions", str(out / "captions.jsonl")]),
        (out / "dataset" / "test.jsonl", ["data", "build", "--out", data, "--images", str(images), *common,
                                          "--captions", str(out / "captions.jsonl"), "--seed", str(seed),
                                          "--negatives", str(negatives)]),
        (runs / "base" / "metrics.json", ["eval", "--model", base, "--data", data, "--out", str(runs / "base"),
                                          "--split", split, *common, "--max-pixels", str(IMAGE_SIZE ** 2), "--batch-size", "20",
                                          "--drop-trained"]),
        (out / "adapters" / "adapters.safetensors", ["lora", "--config", str(lora_yaml), "--model", base,
                                                     "--data", data, "--out", str(out / "adapters"), "--force"]),
        (out / "tuned" / "config.json", ["fuse", "--model", base, "--adapter", str(out / "adapters"),
                                         "--out", str(out / "tuned"), "--force"]),
        (runs / "tuned" / "metrics.json", ["eval", "--model", str(out / "tuned"), "--data", data,
                                           "--out", str(runs / "tuned"), "--split", split, *common, "--baseline", str(runs / "base"),
                                           "--max-pixels", str(IMAGE_SIZE ** 2), "--batch-size", "20", "--drop-trained"]),
        (runs / "base-new-design" / "metrics.json", ["eval", "--model", base, "--images", str(new_design),
                                                     "--out", str(runs / "base-new-design"), *common,
                                                     "--max-pixels", str(IMAGE_SIZE ** 2), "--batch-size", "20",
                                                     "--drop-trained"]),
        (runs / "tuned-new-design" / "metrics.json", ["eval", "--model", str(out / "tuned"), "--images",
                                                      str(new_design), "--out", str(runs / "tuned-new-design"),
                                                      *common, "--baseline", str(runs / "base-new-design"),
                                                      "--max-pixels", str(IMAGE_SIZE ** 2), "--batch-size", "20",
                                                      "--drop-trained"]),
        (out / "report" / "report.html", ["compare", str(runs / "base"), str(runs / "tuned"),
                                          "--also", str(runs / "base-new-design"),
                                          "--also", str(runs / "tuned-new-design"),
                                          "--out", str(out / "report"), *common]),
    ]
    for number, (done, args) in enumerate(steps, 1):
        launched = ranks > 1 and args[0] == "lora"
        if launched:
            args = [*args, "--distributed"]
        shown = f"{LAUNCH} -- cultvlm {shlex.join(args)}" if launched else f"cultvlm {shlex.join(args)}"
        click.echo(f"\n[{number}/{len(steps)}] $ {shown}")
        if done is not None and done.exists():
            click.echo("  (done in an earlier run: skipped)")
            continue
        if launched:
            launch(args, out / "lora_ranks.log")
        else:
            cultvlm.main(args, standalone_mode=False)
    return summary(runs, out / "report", time.perf_counter() - started)


RANKS = 2
LAUNCH = f"mlx.launch --backend ring -n {RANKS}"  # what a user would type for the same run


def training_ranks() -> int:
    """2 on a CPU with two cores or more, else 1. The demo's model is so small that one training
    process keeps one core busy; a second process on the second core halves the LoRA time. On a
    GPU one process has the whole device."""
    import mlx.core as mx

    from .evaluate import cpu_cores

    return RANKS if mx.default_device() == mx.cpu and cpu_cores() >= RANKS else 1


def launch(args: list[str], log: Path) -> None:
    """`cultvlm ARGS` as RANKS processes on this machine, as `mlx.launch --backend ring` starts
    them (MLX_RANK, and MLX_HOSTFILE naming one local port per rank). Started here rather than
    through mlx.launch, whose output relay spins a core when stdin is not a terminal (CI, `&`,
    a pipe) -- one of the two the ranks need. Rank 0 prints; the others write to `log`."""
    import socket
    import subprocess
    import tempfile

    ports = []
    for _ in range(RANKS):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    command = [sys.executable, "-m", "mlx_cultvlm.cli", *args]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as hosts:
        json.dump([[f"127.0.0.1:{port}"] for port in ports], hosts)
    try:
        with open(log, "w") as others:
            ranks = [subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                      stdout=None if rank == 0 else others, stderr=None if rank == 0 else others,
                                      env={**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": hosts.name})
                     for rank in range(RANKS)]
            # A rank that fails leaves the others waiting on the ring: stop them all then.
            while any(p.poll() is None for p in ranks) and not any(p.poll() for p in ranks):
                time.sleep(0.5)
            failed = [rank for rank, p in enumerate(ranks) if p.poll()]
            for p in ranks:
                if p.poll() is None:
                    p.kill()
                p.wait()
    finally:
        os.unlink(hosts.name)
    if failed:
        raise CultvlmError(f"training rank(s) {failed} failed (rank 0 above, the others in {log}): "
                           f"{shlex.join(command)}")


def measure(runs: Path) -> dict:
    """The figures the thresholds hold, per run (see THRESHOLDS), from the runs' metrics.json."""
    read = lambda name: json.loads((runs / name / "metrics.json").read_text(encoding="utf-8"))  # noqa: E731
    base, tuned = read("base"), read("tuned")
    measured = {"base": {"targets": naming(base, "target"), "controls": naming(base, "control"),
                         "false_positives": base["restraint"]["false_positives_on_negatives"]},
                "tuned": {"targets": naming(tuned, "target"), "controls": naming(tuned, "control"),
                          "retention": tuned["baseline"]["retention"],
                          "fact": tuned["roles"]["target"]["fact"], "verify": tuned["roles"]["target"]["verify"],
                          "false_positives": tuned["restraint"]["false_positives_on_negatives"]}}
    for name in ("base-new-design", "tuned-new-design"):
        if (runs / name / "metrics.json").is_file():
            new = read(name)
            measured[name] = {"targets": naming(new, "target"), "controls": naming(new, "control")}
    return measured


def summary(runs: Path, report: Path, seconds: float) -> bool:
    from .report import fig_text

    measured = measure(runs)
    click.echo(f"\nsummary ({seconds / 60:.1f} min; held-out pictures, counted per picture (a picture asked in "
               "ru and en counts once): k/n = share [95% Wilson interval], n = pictures)")
    met = True
    for what, run, key, direction, value in THRESHOLDS:
        fig = measured[run][key]
        ok = fig["value"] is not None and (fig["value"] <= value if direction == "at most" else fig["value"] >= value)
        met &= ok
        shown = fig_text(fig) if fig["n"] else "nothing to measure (n=0)"
        click.echo(f"  {'PASS' if ok else 'FAIL'}  {what}: {shown}; needs {direction} {value:.0%}")
    for run in ("base-new-design", "tuned-new-design"):
        if run in measured:
            click.echo(f"  (no threshold) {run.split('-')[0]} model names the targets in the held-out design: "
                       f"{fig_text(measured[run]['targets'])}; the controls: {fig_text(measured[run]['controls'])}")
    click.echo(f"report: {report / 'report.html'}")
    click.echo("every threshold met" if met else "THRESHOLDS MISSED: see the lines marked FAIL")
    return met


@click.command("demo")
@click.option("--out", default="demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True, help="draws the pictures and seeds training")
def command(out, seed):
    """The whole story offline: teach a tiny model six drawn characters, evaluate, report."""
    if not run_demo(click.get_current_context().find_root().command, Path(out), seed=seed):
        raise SystemExit(1)
