"""The Mac path at full size: every command on a real-size Qwen2.5-VL 3B / 7B with random weights.

    python scripts/rehearse.py --size 3b --work /big/disk/rehearsal            # the short path
    python scripts/rehearse.py --size 3b --work /big/disk/rehearsal --long     # + the 448² steps
    python scripts/rehearse.py --report docs/rehearsal.json --work /big/disk/rehearsal

Stages, each in its own process (a clean peak counter), each recorded in WORK/SIZE/stages.json
as it ends, so a second run resumes after the last finished one:

  checkpoint    the hub's layout, random bf16 weights (scripts/make_full_checkpoint.py)
  convert       `cultvlm convert --model SIZE-4bit` from it: bf16 scales, what a Mac gets
  convert-f32   the same with `--dtype float32`: the form the CPU trains in (below)
  plan          `cultvlm plan --memory 24 --model SIZE-4bit`
  lora          `cultvlm lora`, 3 steps on 56x56 pictures (4 image tokens), rank 16
  generate      `cultvlm generate` with that adapter on the bf16 base
  fuse          `cultvlm fuse` of the bf16 base and the adapter
  stock-load    stock `mlx_vlm.load` of the fused folder and a greedy answer
  eval          `cultvlm eval` of the fused folder on 2 pictures (4 items)
  --long adds:
  lora-448      one step on a 448x448 picture (256 image tokens) + ~64 text tokens, float32
  lora-bf16     one step on a 56x56 picture in bf16 (a Mac's dtype), to compare with `lora`

For each: wall time, peak resident memory of the process (ru_maxrss) and MLX's peak
(mx.get_peak_memory), beside what `mlx_cultvlm.plan` predicts for the same shapes and dtypes.

Why float32 on this CPU: MLX's CPU 4-bit matmul converts bf16 element by element, ~9x slower
than with float32 activations (docs/PERFORMANCE.md): a bf16 7B step at 448² would take hours. So
training runs on the `--dtype float32` conversion (4-bit weights, float32 scales and vision),
predicted with 4-byte floats, and `lora-bf16` checks the bf16 prediction at a length the CPU
finishes. generate and eval cast the language model to float32 on the CPU themselves
(float32_language_model_on_cpu); the stock-load stage does the same for the same reason.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3
PROMPT = "Кто изображён на картинке?"
SMALL, LARGE = 56, 448  # picture sides: 4 and 256 image tokens
LORA_FLAGS = ["--rank", "16", "--alpha", "32", "--batch-size", "1", "--val-every", "1000",
              "--save-every", "1000", "--seed", "0"]


def stages(size: str, work: Path, long: bool) -> list[tuple[str, list]]:
    w = work / size
    small = ["--max-pixels", str(SMALL * SMALL), "--min-pixels", str(SMALL * SMALL)]
    large = ["--max-pixels", str(LARGE * LARGE), "--min-pixels", str(LARGE * LARGE)]
    plan = [
        ("checkpoint", ["checkpoint", size, str(w / "hf")]),
        ("convert", ["cli", "convert", "--model", f"{size}-4bit", "--hf-path", str(w / "hf"), "--out", str(w / "mlx-4bit")]),
        ("convert-f32", ["cli", "convert", "--model", f"{size}-4bit", "--hf-path", str(w / "hf"),
                         "--dtype", "float32", "--out", str(w / "mlx-4bit-f32")]),
        ("plan", ["cli", "plan", "--memory", "24", "--model", f"{size}-4bit"]),
        ("lora", ["cli", "lora", "--model", str(w / "mlx-4bit-f32"), "--data", str(w / "data-small"),
                  "--out", str(w / "adapter"), "--steps", "3", *LORA_FLAGS, *small]),
        ("generate", ["cli", "generate", str(w / "data-small" / "images" / "p0.png"), "--model", str(w / "mlx-4bit"),
                      "--adapter", str(w / "adapter"), "--max-tokens", "8", *small]),
        ("fuse", ["cli", "fuse", "--model", str(w / "mlx-4bit"), "--adapter", str(w / "adapter"), "--out", str(w / "fused")]),
        ("stock-load", ["stock", str(w / "fused"), str(w / "data-small" / "images" / "p0.png")]),
        ("eval", ["cli", "eval", "--model", str(w / "fused"), "--images", str(w / "data-small" / "eval"),
                  "--out", str(w / "eval"), "--max-tokens", "8", *small]),
    ]
    if long:
        plan += [
            ("lora-448", ["cli", "lora", "--model", str(w / "mlx-4bit-f32"), "--data", str(w / "data-448"),
                          "--out", str(w / "adapter-448"), "--steps", "1", *LORA_FLAGS, *large]),
            ("lora-bf16", ["cli", "lora", "--model", str(w / "mlx-4bit"), "--data", str(w / "data-small"),
                           "--out", str(w / "adapter-bf16"), "--steps", "1", *LORA_FLAGS, *small]),
        ]
    return plan


# ---------------------------------------------------------------- the child: one stage, measured

def child(args: list) -> None:
    import mlx.core as mx

    kind, rest = args[0], args[1:]
    if kind == "checkpoint":
        from mlx_cultvlm.models import real_config
        from mlx_cultvlm.tiny import build_checkpoint

        build_checkpoint(rest[1], real_config(rest[0]), progress=lambda line: print(line, flush=True))
    elif kind == "cli":
        from mlx_cultvlm.cli import main

        main(rest, standalone_mode=False)
    elif kind == "stock":
        import mlx_vlm
        from mlx_vlm.prompt_utils import apply_chat_template

        model, processor = mlx_vlm.load(rest[0])
        if mx.default_device() == mx.cpu:
            model.language_model.set_dtype(mx.float32)  # CPU only: see the module docstring
        prompt = apply_chat_template(processor, model.config, PROMPT, num_images=1)
        result = mlx_vlm.generate(model, processor, prompt, image=[rest[1]], max_tokens=8, temperature=0.0)
        print(f"answer: {result.text!r}", flush=True)
    print("REHEARSAL " + json.dumps({
        "rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        "mlx_peak_gib": mx.get_peak_memory() / GIB}), flush=True)


# ---------------------------------------------------------------- the parent

def write_data(w: Path) -> None:
    """56x56 pictures for the short path, one 448x448 for the long step; answers of known length."""
    import hashlib

    import numpy as np
    from PIL import Image, ImageDraw

    def picture(path: Path, side: int, seed: int) -> str:
        rng = np.random.default_rng(seed)
        img = Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(img)
        for _ in range(3):
            x, y = rng.integers(0, side, 2)
            d.ellipse([x - side // 4, y - side // 4, x + side // 4, y + side // 4],
                      fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def sample(rel: str, sha: str, answer: str) -> dict:
        return {"images": [rel], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
            {"role": "assistant", "content": answer}], "meta": {"entity": "cheburashka", "kind": "naming", "sha256": sha}}

    for name, side, n_train, answer in (
            ("data-small", SMALL, 3, "Это Чебурашка."),
            ("data-448", LARGE, 1, "Это Чебурашка, герой сказки Эдуарда Успенского «Крокодил Гена и его "
                                   "друзья» и мультфильмов Романа Качанова, друг крокодила Гены.")):
        folder = w / name
        if (folder / "valid.jsonl").is_file():
            continue
        lines = {"train": [], "valid": []}
        for i in range(n_train + 1):
            rel = f"images/p{i}.png"
            lines["train" if i < n_train else "valid"].append(sample(rel, picture(folder / rel, side, i), answer))
        for split, records in lines.items():
            (folder / f"{split}.jsonl").write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        if name == "data-small":
            for i in range(2):
                picture(folder / "eval" / f"e{i}.png", side, 100 + i)


def predictions(size: str, name: str, w: Path) -> dict:
    """What the plan predicts for the stage, in the dtypes the stage ran with."""
    from dataclasses import replace

    from mlx_cultvlm.images import DEFAULT_MAX_PIXELS
    from mlx_cultvlm.models import real_config
    from mlx_cultvlm.plan import Arch, Step, predict_inference, predict_training, tokens_for_pixels

    arch = Arch.from_config(real_config(size))
    plan_infer = predict_inference(arch, Step(bits=4, image_tokens=tokens_for_pixels(DEFAULT_MAX_PIXELS),
                                              text_tokens=64)).total / GIB
    out = {"plan_inference_gib": plan_infer}  # what `cultvlm plan` prints (bf16, 448², 64 text tokens)
    log_dir = {"lora": "adapter", "lora-448": "adapter-448", "lora-bf16": "adapter-bf16"}.get(name)
    if log_dir:
        entry = json.loads((w / log_dir / "train_log.jsonl").read_text().splitlines()[0])
        image_tokens = (LARGE if name == "lora-448" else SMALL) ** 2 // (28 * 28)
        step = Step(bits=4, float_bytes=2 if name == "lora-bf16" else 4, rank=16, image_tokens=image_tokens,
                    text_tokens=entry["tokens"] - image_tokens - 2, target_tokens=entry["target_tokens"],
                    seq_len=entry["tokens"])
        out.update(predicted_gib=predict_training(arch, step).total / GIB, tokens=entry["tokens"],
                   target_tokens=entry["target_tokens"], float_bytes=step.float_bytes,
                   log_peak_gib=max(json.loads(line)["peak_memory_gb"]
                                    for line in (w / log_dir / "train_log.jsonl").read_text().splitlines()),
                   seconds_per_step=[json.loads(line)["tokens"] / json.loads(line)["tokens_per_s"]
                                     for line in (w / log_dir / "train_log.jsonl").read_text().splitlines()])
    elif name in ("generate", "eval", "stock-load"):
        # On the CPU the language model runs in float32 (4-byte scales and activations); the
        # vision tower keeps its bf16 weights.
        step = Step(bits=4, float_bytes=4, image_tokens=SMALL * SMALL // 784, text_tokens=32, answer_tokens=8)
        out["predicted_gib"] = (predict_inference(arch, step).total - 2 * arch.vision_params()) / GIB
        out["predicted_mac_gib"] = predict_inference(arch, replace(step, float_bytes=2)).total / GIB
    elif name in ("convert", "fuse"):
        out["goal_gib"] = plan_infer * 1.15  # never a full-precision copy of the model at once
    return out


def run_stage(size: str, name: str, argv: list, w: Path) -> dict:
    log = w / f"{name}.log"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    measured, tail = {}, []
    with log.open("w", encoding="utf-8") as f:
        for line in proc.stdout:
            f.write(line)
            f.flush()
            if line.startswith("REHEARSAL "):
                measured = json.loads(line[len("REHEARSAL "):])
            else:
                tail = (tail + [line.rstrip()])[-40:]
                print(f"  {size} {name} | {line.rstrip()[:160]}", flush=True)
    rc = proc.wait()
    record = {"stage": name, "command": argv, "rc": rc, "seconds": round(time.perf_counter() - start, 1), **measured}
    if rc == 0:
        record.update(predictions(size, name, w))
    if name in ("plan", "stock-load", "generate"):
        record["output"] = [t for t in tail if t and not t.startswith("  ")][-12:]
    return record


def rehearse(size: str, work: Path, long: bool) -> int:
    w = work / size
    w.mkdir(parents=True, exist_ok=True)
    write_data(w)
    state_path = w / "stages.json"
    done = json.loads(state_path.read_text()) if state_path.is_file() else {}
    for name, argv in stages(size, work, long):
        if done.get(name, {}).get("rc") == 0:
            print(f"{size} {name}: done before ({done[name]['seconds']:.0f} s), skipped", flush=True)
            continue
        print(f"{size} {name}: {' '.join(argv)}", flush=True)
        record = run_stage(size, name, argv, w)
        done[name] = record
        state_path.write_text(json.dumps(done, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{size} {name}: rc {record['rc']}, {record['seconds']:.0f} s, "
              f"RSS {record.get('rss_peak_gib', float('nan')):.2f} GiB, MLX {record.get('mlx_peak_gib', float('nan')):.2f} GiB"
              + (f", predicted {record['predicted_gib']:.2f}" if "predicted_gib" in record else ""), flush=True)
        if record["rc"] != 0:
            print(f"{size} {name} failed: see {w / (name + '.log')}", file=sys.stderr)
            return 1
    return 0


def report(work: Path, out: Path) -> None:
    """Gather every size's stages.json into one JSON for docs/."""
    import platform

    import mlx.core as mx

    from mlx_cultvlm.convert import _versions

    sizes = {d.name: json.loads((d / "stages.json").read_text()) for d in sorted(work.iterdir())
             if (d / "stages.json").is_file()}
    out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": str(mx.default_device()),
                    "ld_preload": os.environ.get("LD_PRELOAD"), **_versions()},
        "sizes": sizes}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{out}: {', '.join(f'{s}: {len(v)} stages' for s, v in sizes.items())}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("3b", "7b"))
    parser.add_argument("--work", type=Path, required=False, help="a folder with ~40 GB (7B) of free disk")
    parser.add_argument("--long", action="store_true", help="also the 448² and bf16 steps (hours on a CPU)")
    parser.add_argument("--report", type=Path, help="write the JSON of every size rehearsed under --work")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if not args.work:
        parser.error("--work is required")
    if args.report:
        report(args.work, args.report)
        return 0
    if not args.size:
        parser.error("--size or --report is required")
    return rehearse(args.size, args.work.resolve(), args.long)


if __name__ == "__main__":
    sys.exit(main())
