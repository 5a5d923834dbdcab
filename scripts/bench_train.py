"""Training speed: cultvlm's LoRA loop against mlx-vlm's own LoRA trainer, like for like.

    python scripts/bench_train.py [--models tiny mid] [--per-entity 8] [--batch-size 4] [--epochs 4]
                                  [--image-side 224] [--repeats 1] [--save [docs/bench_train.json]]
    python scripts/bench_train.py --models tiny --per-entity 2 --epochs 2 --image-side 56   # a minute
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_CORETYPE=SkylakeX \
        python scripts/bench_train.py --repeats 3 --save      # docs/bench_train.json (see `cultvlm doctor`)

Builds the tiny Qwen2.5-VL and a mid-size one (random weights, 4-bit group 64, as
scripts/bench_eval.py does; scales, vision tower and activations in float32 by default, as
scripts/bench_memory.py: bfloat16 matmuls, 4-bit ones included, are ~7x slower on the CPU backend
and would bury both trainers under one slow kernel -- `--dtype bfloat16` measures that too) and a
synthetic single-image dataset (tests/synthetic.py's coloured shapes, drawn at
--image-side pixels, a multiple of 28, so both trainers keep every image at exactly that size:
the same pixel budget and image tokens), then trains each model three times, each run in its own
process (a clean peak-memory counter):

- cultvlm: `mlx_cultvlm.lora.train(LoraConfig(...))`, vision-feature cache on (the default);
- cultvlm with `feature_cache=False` (vision tower run on every step);
- mlx-vlm: its CLI's own functions, `mlx_vlm.train.parse_args(argv)` + `mlx_vlm.train.run(...)`
  (what `python -m mlx_vlm.train ARGV` runs; `run` also takes a metrics callback and returns
  the final metrics), with `--train-on-completions` so that only the assistant answer carries
  loss, as in cultvlm.

Both get the same LoRA (rank, alpha, dropout 0, the seven decoder linears), batch size, AdamW
with a constant learning rate (cultvlm: no warmup, min_lr_ratio 1, clipping disabled with
max_grad_norm 1e9, since mlx-vlm's CLI has neither schedule nor clipping), weight decay 0,
the same seed, and the same number of optimizer steps: `epochs` whole passes over the training set
(the set is a multiple of the batch size, so mlx-vlm, which drops incomplete batches, and
cultvlm see every sample exactly `epochs` times). Each validates once, at the end.

Tokens are counted the same way for both: every non-padding token of every sequence trained on
(system + user prompt, image placeholders, answer and special tokens), i.e. `epochs` times the
sum of the tokenized lengths of the training samples. The script checks that both tokenize
every sample to the same ids. tokens/s divides by the time of the training steps (data
preparation of each step included; model loading, validation and saving excluded: the
`seconds` of cultvlm's train_log.jsonl, mlx-vlm's train_time + data_time); `wall_s` is the
whole call. Peak memory is `mx.get_peak_memory()` of each process after its training call.

The losses: each trainer's own last-epoch training loss and final validation loss (mlx-vlm's
completion mask also covers the newline after the answer's `<|im_end|>`: one more target token
per sample), and both final adapters scored by the same evaluator (cultvlm's `evaluate_loss`,
assistant tokens only) on the training and validation sets. Repeat r runs both trainers with
seed r (LoRA initialisation, data order), so the seed-to-seed spread of the losses is visible:
after a few dozen steps at a high learning rate it is large. A parity check runs one batch
through both forward passes with cultvlm's mask: same loss and LoRA gradients.

Prints one JSON line; `--save` also writes it (to docs/bench_train.json by default). The load
average is recorded (at the start, the end and after each run): on a shared CPU, rerun with
--repeats 3 (medians are reported) when it is idle. An OpenBLAS preload (docs/PERFORMANCE.md) is
inherited by the training processes and recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # synthetic.py: the test suite's entities and samples
sys.path.insert(0, str(ROOT / "scripts"))  # bench_eval.py: the model specs

TEXT_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NO_CLIP = 1e9


# ---------------------------------------------------------------- setup (parent process)

def build_models(names: list[str], folder: Path, dtype: str | None) -> dict[str, Path]:
    from bench_eval import RANDOM_MODELS as MODELS

    from mlx_cultvlm.convert import convert
    from mlx_cultvlm.tiny import build_tiny_qwen

    out = {}
    for name in names:
        for old in (folder / f"{name}-hf", folder / f"{name}-4bit"):  # a reused --work-dir: rebuild
            shutil.rmtree(old, ignore_errors=True)
        hf = build_tiny_qwen(folder / f"{name}-hf", MODELS[name])
        out[name] = convert("tiny-4bit", hf_path=str(hf), out=folder / f"{name}-4bit", dtype=dtype)
    return out


def build_dataset(root: Path, per_entity: dict[str, int], side: int, seed: int = 0) -> dict[str, int]:
    """train.jsonl / valid.jsonl of single-image samples, one new picture per sample."""
    import hashlib

    import numpy as np
    from synthetic import ENTITIES, PHRASINGS, draw, sample

    rng = np.random.default_rng(seed)
    counts = {}
    for split, n in per_entity.items():
        rows = []
        for k, (name, shape, colour, background) in enumerate(ENTITIES):
            for i in range(n):
                rel = f"images/{split}/{k}_{i}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                draw(shape, colour, background, rng, size=side).save(root / rel)
                rows.append(sample(rel, name, hashlib.sha256((root / rel).read_bytes()).hexdigest(),
                                   PHRASINGS[i % len(PHRASINGS)]))
        (root / f"{split}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        counts[split] = len(rows)
    return counts


def mlx_vlm_argv(job: dict) -> list[str]:
    s = job["settings"]
    return ["--model", job["model"], "--data", job["data"], "--output-path", job["out"],
            "--iters", str(s["steps"]), "--batch-size", str(s["batch_size"]),
            "--learning-rate", str(s["learning_rate"]), "--optimizer", "adamw", "--weight-decay", "0",
            "--lora-rank", str(s["rank"]), "--lora-alpha", str(s["alpha"]), "--lora-dropout", "0",
            "--target-modules", *TEXT_LINEARS, "--train-on-completions",
            "--max-seq-length", str(s["max_seq_len"]), "--seed", str(s["seed"]),
            "--steps-per-report", str(s["steps_per_epoch"]), "--steps-per-eval", str(s["steps"]),
            "--val-batches", "-1", "--steps-per-save", str(s["steps"])]


# ---------------------------------------------------------------- one training run (child process)

def run_cultvlm(job: dict) -> dict:
    import mlx.core as mx
    import mlx_vlm  # noqa: F401  (imported before the clock starts, as in the mlx-vlm run)

    from mlx_cultvlm.lora import load_config, train

    s = job["settings"]
    cfg = load_config(None, dict(
        model=job["model"], data=job["data"], out=job["out"], max_pixels=s["image_side"] ** 2,
        max_seq_len=s["max_seq_len"], rank=s["rank"], alpha=s["alpha"], dropout=0.0, targets=TEXT_LINEARS,
        steps=s["steps"], batch_size=s["batch_size"], grad_accum=1, learning_rate=s["learning_rate"],
        warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, max_grad_norm=NO_CLIP,
        feature_cache=job["feature_cache"], seed=s["seed"], val_every=s["steps"], save_every=s["steps"]))
    start = time.perf_counter()
    train(cfg, force=True, progress=False)
    wall = time.perf_counter() - start
    peak = mx.get_peak_memory()
    log = [json.loads(line) for line in (Path(job["out"]) / "train_log.jsonl").read_text().splitlines() if line]
    spe = s["steps_per_epoch"]
    epochs = []
    for e in range(0, len(log), spe):
        steps = log[e:e + spe]
        targets = sum(x["target_tokens"] for x in steps)
        epochs.append({"tokens": sum(x["tokens"] for x in steps), "target_tokens": targets,
                       "seconds": sum(x["tokens"] / x["tokens_per_s"] for x in steps),
                       "loss": sum(x["loss"] * x["target_tokens"] for x in steps) / targets})
    return {"steps": len(log), "sequences": len(log) * s["batch_size"], "epochs": epochs,
            "final_val_loss": log[-1]["val_loss"], "wall_s": wall, "peak_memory_bytes": peak}


def run_mlx_vlm(job: dict) -> dict:
    import mlx.core as mx
    from mlx_vlm import train as mlx_vlm_train
    from mlx_vlm.trainer.common.callbacks import TrainingCallback

    reports, validations = [], []

    class Collect(TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append(info)

        def on_val_loss_report(self, info):
            validations.append(info)

    args, settings = mlx_vlm_train.parse_args(mlx_vlm_argv(job))
    start = time.perf_counter()
    final = mlx_vlm_train.run(args, settings, training_callback=Collect())
    wall = time.perf_counter() - start
    peak = mx.get_peak_memory()
    spe = job["settings"]["steps_per_epoch"]
    if any(r["iteration"] % spe for r in reports) or len(reports) != job["settings"]["epochs"]:
        raise SystemExit(f"mlx-vlm reported at iterations {[r['iteration'] for r in reports]}, not once per epoch")
    epochs = [{"processed_tokens": r["train_num_processed_tokens"], "target_tokens": r["train_num_tokens"],
               "sequences": r["train_num_sequences"],
               "seconds": (r["step_time"] + r["data_time_per_step"]) * spe, "loss": r["train_loss"]}
              for r in reports]
    return {"steps": final["optimizer_step"], "sequences": sum(e["sequences"] for e in epochs), "epochs": epochs,
            "final_val_loss": validations[-1]["val_loss"] if validations else None,
            "wall_s": wall, "peak_memory_bytes": peak}


def same_evaluator(job: dict) -> dict:
    """The saved adapter loaded by cultvlm's strict loader and scored by cultvlm's evaluator
    (mean cross-entropy per assistant token, no dropout) on both splits; plus the tokenized
    length of every training sample and, for mlx-vlm, whether its tokenization is the same."""
    import numpy as np

    from mlx_cultvlm.vlm import load_model
    from mlx_cultvlm.images import DEFAULT_MIN_PIXELS
    from mlx_cultvlm.lora import evaluate_loss
    from mlx_cultvlm.samples import SampleEncoder, load_split

    s = job["settings"]
    model, processor = load_model(job["model"], adapter=job["out"])
    encoder = SampleEncoder(processor, DEFAULT_MIN_PIXELS, s["image_side"] ** 2, s["max_seq_len"])
    data = Path(job["data"])
    train_set, _ = load_split(data / "train.jsonl", encoder)
    valid_set, _ = load_split(data / "valid.jsonl", encoder)
    out = {"train_loss": evaluate_loss(model, train_set, encoder, s["batch_size"]),
           "valid_loss": evaluate_loss(model, valid_set, encoder, s["batch_size"]),
           "sample_lengths": [len(x.input_ids) for x in train_set],
           "sample_targets": [int(x.loss_mask.sum()) for x in train_set]}
    if job["trainer"] == "mlx-vlm":
        from types import SimpleNamespace

        from mlx_vlm.trainer.datasets.loading import load
        from mlx_vlm.trainer.vlm.sft.dataset import VisionDataset

        rows = load(str(data))["train"]
        theirs = VisionDataset(rows, model.config, processor, config=SimpleNamespace(train_on_completions=True))
        items = [theirs[i] for i in range(len(rows))]
        out["identical_input_ids"] = all(
            np.array_equal(np.asarray(it["input_ids"]), x.input_ids) for it, x in zip(items, train_set))
        out["sample_targets"] = [int(np.asarray(it["completion_mask"]).sum()) for it in items]
        out["image_tokens"] = sorted({int(np.asarray(it["image_grid_thw"]).prod()) // 4 for it in items})
        out["parity"] = parity(model, encoder, train_set[:s["batch_size"]], items[:s["batch_size"]])
    return out


def parity(model, encoder, samples, items) -> dict:
    """Loss and LoRA gradients of one batch through cultvlm's forward (`batch_loss`) and through
    mlx-vlm's (`vlm_sft_loss`, the model's own __call__), with cultvlm's mask in both: the two
    trainers compute the same objective, so speed is not bought by computing something else."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_vlm.trainer.vlm.sft.runtime import collate_vlm_batch, vlm_sft_loss

    from mlx_cultvlm.lora import batch_loss, step_inputs
    from mlx_cultvlm.vlm import image_features
    from mlx_cultvlm.samples import make_batch

    s = step_inputs(model, make_batch(samples, encoder), encoder.image_pad_id)

    def ours(model):
        feats = image_features(model, s.pixel_values, s.grid)
        total, n = batch_loss(model, s.input_ids, feats, s.gather_index, s.position_ids, s.target_rows,
                              s.targets, s.weights)
        return total / n

    items = [dict(it, completion_mask=mx.array(x.loss_mask.astype(np.int32))) for it, x in zip(items, samples)]
    batch = collate_vlm_batch(items, encoder.max_seq_len, pad_to_multiple=32, pad_token_id=encoder.pad_id)
    theirs = lambda model: vlm_sft_loss(model, batch, train_on_completions=True)[0]  # noqa: E731
    (l1, g1), (l2, g2) = nn.value_and_grad(model, ours)(model), nn.value_and_grad(model, theirs)(model)
    g1, g2 = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    diff = sum(((g1[k] - g2[k]) ** 2).sum().item() for k in g1) ** 0.5
    norm = sum((g ** 2).sum().item() for g in g1.values()) ** 0.5
    return {"loss_cultvlm": l1.item(), "loss_mlx_vlm": l2.item(), "grad_rel_diff": diff / norm}


def child(job: dict) -> None:
    result = run_cultvlm(job) if job["trainer"] == "cultvlm" else run_mlx_vlm(job)
    result["same_evaluator"] = same_evaluator(job)  # after the peak was read
    result["load_avg_1m"] = os.getloadavg()[0]
    print("\n" + json.dumps(result))


def run_job(job: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{job['trainer']} run failed ({proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- summary

def summarize(runs: list[dict], settings: dict) -> dict:
    """Medians over repeats of one trainer's runs (repeat r uses seed r, for both trainers)."""
    first = runs[0]
    epoch_tokens = sum(first["same_evaluator"]["sample_lengths"])  # every epoch covers every sample once
    n_epochs = settings["epochs"]

    def per_run(r):
        seconds = sum(e["seconds"] for e in r["epochs"])
        return {"tokens_per_s": epoch_tokens * n_epochs / seconds, "steps_per_s": r["steps"] / seconds,
                "loop_s": seconds, "wall_s": r["wall_s"], "peak_memory_gb": r["peak_memory_bytes"] / 1e9,
                "epoch_tokens_per_s": [epoch_tokens / e["seconds"] for e in r["epochs"]]}

    measured = [per_run(r) for r in runs]
    med = lambda key: statistics.median(m[key] for m in measured)  # noqa: E731
    target_tokens = sum(e["target_tokens"] for e in first["epochs"])
    seeds = lambda f: [f(r) for r in runs]  # noqa: E731
    out = {"steps": first["steps"], "sequences": first["sequences"], "tokens": epoch_tokens * n_epochs,
           "target_tokens": target_tokens,
           "tokens_per_s": med("tokens_per_s"), "target_tokens_per_s": target_tokens / med("loop_s"),
           "steps_per_s": med("steps_per_s"), "loop_s": med("loop_s"), "wall_s": med("wall_s"),
           "peak_memory_gb": med("peak_memory_gb"),
           "epoch_tokens_per_s": [statistics.median(m["epoch_tokens_per_s"][e] for m in measured)
                                  for e in range(n_epochs)],
           "tokens_per_s_runs": [m["tokens_per_s"] for m in measured],
           "load_avg_1m_runs": seeds(lambda r: r["load_avg_1m"]),
           "epoch_losses_seed0": [e["loss"] for e in first["epochs"]],
           "final_train_loss": statistics.median(seeds(lambda r: r["epochs"][-1]["loss"])),
           "final_train_loss_per_seed": seeds(lambda r: r["epochs"][-1]["loss"]),
           "final_val_loss_per_seed": seeds(lambda r: r["final_val_loss"]),
           "same_evaluator": {
               "train_loss": statistics.median(seeds(lambda r: r["same_evaluator"]["train_loss"])),
               "valid_loss": statistics.median(seeds(lambda r: r["same_evaluator"]["valid_loss"])),
               "valid_loss_per_seed": seeds(lambda r: r["same_evaluator"]["valid_loss"])}}
    if "tokens" in first["epochs"][0]:  # cultvlm's own count (train_log.jsonl), to check ours against
        out["logged_tokens_match"] = all(sum(e["tokens"] for e in r["epochs"]) == out["tokens"] for r in runs)
    if "processed_tokens" in first["epochs"][0]:  # mlx-vlm's own count, for the record
        out["mlx_vlm_processed_tokens"] = sum(e["processed_tokens"] for e in first["epochs"])
    return out


def compare(name: str, runs: dict[str, list[dict]], settings: dict) -> dict:
    cult, nocache, theirs = (summarize(runs[k], settings) for k in ("cultvlm", "cultvlm_no_cache", "mlx_vlm"))
    ev_cult, ev_theirs = runs["cultvlm"][0]["same_evaluator"], runs["mlx_vlm"][0]["same_evaluator"]
    for label, s in (("cultvlm", cult), ("cultvlm_no_cache", nocache), ("mlx_vlm", theirs)):
        if s["steps"] != settings["steps"] or s["sequences"] != settings["steps"] * settings["batch_size"]:
            raise SystemExit(f"{name}/{label}: {s['steps']} steps over {s['sequences']} sequences, "
                             f"expected {settings['steps']} over {settings['steps'] * settings['batch_size']}")

    def later(s):  # epochs 2.. (the feature cache is full)
        return statistics.mean(s["epoch_tokens_per_s"][1:]) if len(s["epoch_tokens_per_s"]) > 1 else None

    ratio = cult["tokens_per_s"] / theirs["tokens_per_s"]
    memory = cult["peak_memory_gb"] / theirs["peak_memory_gb"]
    # Losses: medians over seeds, scored by the same evaluator. "Comparable": the medians are
    # within 0.1 nats or 10 %, or the two trainers' per-seed ranges overlap.
    gap = abs(cult["same_evaluator"]["valid_loss"] - theirs["same_evaluator"]["valid_loss"])
    (lo1, hi1), (lo2, hi2) = ((min(x), max(x)) for x in (cult["same_evaluator"]["valid_loss_per_seed"],
                                                        theirs["same_evaluator"]["valid_loss_per_seed"]))
    overlap = lo1 <= hi2 and lo2 <= hi1
    comparable = gap <= max(0.1, 0.1 * theirs["same_evaluator"]["valid_loss"]) or overlap
    parity = ev_theirs["parity"]
    return {
        "cultvlm": cult, "mlx_vlm": theirs, "cultvlm_no_feature_cache": nocache,
        "ratios": {"tokens_per_s": ratio, "peak_memory": memory,
                   "valid_loss_gap_same_evaluator": gap, "valid_loss_ranges_overlap": overlap},
        "feature_cache": {
            "epoch1_tokens_per_s": cult["epoch_tokens_per_s"][0], "later_epochs_tokens_per_s": later(cult),
            "no_cache_epoch1_tokens_per_s": nocache["epoch_tokens_per_s"][0],
            "no_cache_later_epochs_tokens_per_s": later(nocache),
            "later_epochs_speedup": later(cult) / later(nocache) if later(nocache) else None,
            "same_loss_as_no_cache": all(abs(a - b) < 1e-3 for a, b in zip(
                cult["final_train_loss_per_seed"], nocache["final_train_loss_per_seed"]))},
        "checks": {"identical_input_ids": ev_theirs["identical_input_ids"],
                   "same_loss_and_grads_on_one_batch": parity,
                   "image_tokens_per_sample": ev_theirs["image_tokens"],
                   "target_tokens_per_sample": {"cultvlm": sorted(set(ev_cult["sample_targets"])),
                                                "mlx_vlm": sorted(set(ev_theirs["sample_targets"]))}},
        "targets_met": {"tokens_per_s_ratio_ge_1.2": ratio >= 1.2, "peak_memory_ratio_le_1.0": memory <= 1.0,
                        "losses_comparable": comparable},
    }


def machine() -> dict:
    import platform

    import mlx.core as mx
    import mlx_vlm

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "mlx": mx.__version__,
            "mlx_vlm": mlx_vlm.__version__, "device": str(mx.default_device()),
            "ld_preload": os.environ.get("LD_PRELOAD", ""),
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", ""),
            "load_avg_start": list(os.getloadavg())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one training run, as JSON
    parser.add_argument("--models", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    parser.add_argument("--per-entity", type=int, default=8, help="training samples per entity (4 entities)")
    parser.add_argument("--valid-per-entity", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-side", type=int, default=224, help="pixels, a multiple of 28 (224: 64 image tokens)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the converted models' scales, vision tower and activations (bfloat16 is what "
                             "`cultvlm convert` keeps by default; on a CPU its matmuls are ~7x slower)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each trainer, repeat r with seed r (LoRA init, data order); medians reported")
    parser.add_argument("--work-dir", help="keep models, data and adapters here (default: a temporary folder)")
    parser.add_argument("--save", nargs="?", const=str(ROOT / "docs" / "bench_train.json"), default=None,
                        help="also write the JSON line here (default docs/bench_train.json)")
    args = parser.parse_args()
    if args.one:
        child(json.loads(args.one))
        return

    n_train = 4 * args.per_entity
    if args.image_side % 28 or n_train % args.batch_size or args.epochs < 1:
        parser.error("--image-side must be a multiple of 28, and 4 x --per-entity a multiple of --batch-size")
    spe = n_train // args.batch_size
    settings = {"train_samples": n_train, "valid_samples": 4 * args.valid_per_entity, "batch_size": args.batch_size,
                "epochs": args.epochs, "steps_per_epoch": spe, "steps": spe * args.epochs,
                "model": "4-bit (group 64) text weights; scales, vision tower and activations in " + args.dtype,
                "image_side": args.image_side, "image_tokens": (args.image_side // 28) ** 2,
                "rank": args.rank, "alpha": args.alpha, "lora_targets": TEXT_LINEARS, "dropout": 0.0,
                "learning_rate": args.learning_rate, "schedule": "constant (no warmup, no decay)",
                "optimizer": "AdamW, weight decay 0", "grad_clipping": "none (cultvlm max_grad_norm 1e9)",
                "max_seq_len": args.max_seq_len, "seeds": list(range(args.repeats)), "repeats": args.repeats}
    report = {"bench": "train", "machine": machine(), "settings": settings,
              "token_count": ("tokens = every non-padding token of every sequence trained on (system/user prompt, "
                              "image placeholders, answer, special tokens) = epochs x sum of the training samples' "
                              "tokenized lengths, the same for both trainers (same samples, identical ids: checked); "
                              "target_tokens = tokens carrying loss, as each trainer masks them"),
              "timing": ("tokens/s and steps/s over the training steps only, each step's data preparation included "
                         "(cultvlm: train_log seconds; mlx-vlm: train_time + data_time); wall_s = the whole train "
                         "call (model load, data, steps, validation, save)"),
              "loss_mask": ("cultvlm: every assistant turn through its <|im_end|>; mlx-vlm run with "
                            "--train-on-completions: the last assistant turn from after '<|im_start|>assistant\\n' "
                            "to the end, i.e. also the newline after <|im_end|> (one more target token per sample); "
                            "'same_evaluator' scores both adapters with cultvlm's evaluate_loss"),
              "mlx_vlm_command": None}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        models = build_models(args.models, work, args.dtype)
        data = work / "data"
        build_dataset(data, {"train": args.per_entity, "valid": args.valid_per_entity}, args.image_side)
        runs = {name: {"cultvlm": [], "cultvlm_no_cache": [], "mlx_vlm": []} for name in args.models}
        kinds = ["cultvlm", "mlx_vlm", "cultvlm_no_cache"]
        for rep in range(args.repeats):
            for name, model_dir in models.items():
                for kind in kinds[rep % 3:] + kinds[:rep % 3]:  # rotate the order between repeats
                    job = {"trainer": "mlx-vlm" if kind == "mlx_vlm" else "cultvlm", "model": str(model_dir),
                           "data": str(data), "out": str(work / f"out-{name}-{kind}"),
                           "feature_cache": kind == "cultvlm", "settings": dict(settings, seed=rep)}
                    if report["mlx_vlm_command"] is None and kind == "mlx_vlm":
                        report["mlx_vlm_command"] = "python -m mlx_vlm.train " + " ".join(mlx_vlm_argv(job))
                    print(f"[{rep + 1}/{args.repeats}] {name} {kind} ...", file=sys.stderr, flush=True)
                    runs[name][kind].append(run_job(job))
        for name in args.models:
            report[name] = compare(name, runs[name], settings)
    report["machine"]["load_avg_end"] = list(os.getloadavg())
    line = json.dumps(report)
    print(line)
    if args.save:
        Path(args.save).write_text(line + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
