"""Evaluation speed: the same probe items answered one by one and in batches.

    python scripts/bench_eval.py [--items 40] [--batch-size 20] [--max-tokens 32] [--repeats 3] [--save]

Three models, each asked the same probe questions (every question kind the evaluation asks,
five per picture) greedily through `cultvlm generate`'s one-by-one streaming path and through
`cultvlm eval`'s batched path, the latter on one CPU core and on every core (as eval runs it),
each path --repeats times; the language model in float32 on the CPU, as both commands run it,
and MLX's evaluation order widened as `cultvlm eval` widens it (`let_cpu_streams_overlap`):

- `demo_base`: the shipped demo base (data/demo_base, a trained tiny model, float32) on drawn
  demo characters at the demo's pixel budget -- answers end on their own, as a real model's do;
- `tiny` and `mid`: random-weight 4-bit models built in a temporary folder, on generated
  pictures -- their answers never end, so every item runs to --max-tokens (the worst case for
  batching: decoding dominates and nothing is shared).

Prints one JSON line (and with --save writes docs/bench_eval.json): items/s of each path from
its median time, the speedup of the batched path over the one-by-one path (and on one core), and
whether every answer of every run is identical.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image, ImageDraw

from mlx_cultvlm import characters, evaluate
from mlx_cultvlm.convert import convert
from mlx_cultvlm.data.catalog import load_catalog
from mlx_cultvlm.demo import BASE_DIR, IMAGE_SIZE
from mlx_cultvlm.evaluate import items_for_image
from mlx_cultvlm.generate import stream_answer
from mlx_cultvlm.vlm import float32_language_model_on_cpu, load_model
from mlx_cultvlm.tiny import TinySpec, build_tiny_qwen

ROOT = Path(__file__).resolve().parent.parent
RANDOM_MODELS = {
    "tiny": TinySpec(),
    "mid": TinySpec(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=704, mrope_section=[8, 12, 12], vision_depth=4, vision_hidden_size=128,
                    vision_heads=4, vision_intermediate_size=256, fullatt_block_indexes=[3]),
}


def random_pictures(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        img = Image.new("RGB", (224, 224), tuple(int(v) for v in rng.integers(0, 255, 3)))
        d = ImageDraw.Draw(img)
        for _ in range(4):
            x, y = (int(v) for v in rng.integers(0, 200, 2))
            d.ellipse((x, y, x + 40, y + 40), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        paths.append(folder / f"{i}.png")
        img.save(paths[-1])
    return paths


def probe_items(pictures: list[tuple[Path, str]], catalog, n: int) -> list[dict]:
    """The evaluation's items for (picture, entity id) pairs, in eval's order, first n."""
    return [i for k, (path, entity) in enumerate(pictures)
            for i in items_for_image(str(path), f"{k:064x}", catalog[entity], catalog)][:n]


def batched(model, processor, items: list[dict], batch_size: int, max_tokens: int, max_pixels: int,
            cores: int) -> list[str]:
    """`cultvlm eval`'s path, its batches shared out among `cores` CPU cores."""
    real, evaluate.cpu_cores = evaluate.cpu_cores, lambda: cores
    try:
        return [answer for b in range(0, len(items), batch_size)
                for answer in evaluate.generate_answers(model, processor, items[b:b + batch_size], max_tokens,
                                                        3136, max_pixels)]
    finally:
        evaluate.cpu_cores = real


def measure(model_dir: Path, items: list[dict], batch_size: int, max_tokens: int, max_pixels: int,
            repeats: int) -> dict:
    """The one-by-one path, the batched path on one core and on every core, `repeats` times
    each, alternating; items/s from the median time of each."""
    model, processor = load_model(str(model_dir))
    float32_language_model_on_cpu(model)
    stream_answer(model, processor, items[0]["image"], items[0]["prompt"], max_tokens=4)  # warm up
    paths = {"one_by_one": lambda: ["".join(stream_answer(model, processor, i["image"], i["prompt"],
                                                          max_tokens=max_tokens, max_pixels=max_pixels)).strip()
                                    for i in items],
             "batched_one_core": lambda: batched(model, processor, items, batch_size, max_tokens, max_pixels, 1),
             "batched": lambda: batched(model, processor, items, batch_size, max_tokens, max_pixels,
                                        evaluate.cpu_cores())}
    seconds, answers = {name: [] for name in paths}, {name: [] for name in paths}
    for _ in range(repeats):
        for name, run in paths.items():
            start = time.perf_counter()
            answers[name].append(run())
            seconds[name].append(time.perf_counter() - start)
    median = {name: float(np.median(s)) for name, s in seconds.items()}
    single = answers["one_by_one"][0]
    runs = answers["one_by_one"][1:] + answers["batched_one_core"] + answers["batched"]
    return {**{f"{name}_items_per_s": len(items) / median[name] for name in paths},
            "speedup": median["one_by_one"] / median["batched"],
            "speedup_one_core": median["one_by_one"] / median["batched_one_core"], "seconds": seconds,
            "identical_answers": all(run == single for run in runs),
            "identical_count": min(sum(a == b for a, b in zip(single, run)) for run in runs),
            "mean_answer_chars": float(np.mean([len(a) for a in single])), "example_answer": single[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each path; the median counts")
    parser.add_argument("--save", action="store_true", help="also write docs/bench_eval.json")
    args = parser.parse_args()
    evaluate.let_cpu_streams_overlap()  # as `cultvlm eval` does
    result = {"bench": "eval", "items": args.items, "batch_size": args.batch_size, "max_tokens": args.max_tokens,
              "repeats": args.repeats, "cpu_cores": evaluate.cpu_cores(),
              "mlx_bfs_max_width": os.environ.get("MLX_BFS_MAX_WIDTH"),
              "machine": {"platform": platform.platform(), "mlx": mx.__version__, "device": str(mx.default_device())}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo_catalog = tmp / "demo_catalog.json"
        demo_catalog.write_text(json.dumps(characters.DEMO_CATALOG, ensure_ascii=False), encoding="utf-8")
        drawn = characters.write_images(tmp / "drawn", per_entity=2, seed=12345, size=IMAGE_SIZE)
        pictures = [(p, entity) for entity, paths in drawn.items() for p in paths]
        items = probe_items(pictures, load_catalog(demo_catalog), args.items)
        result["demo_base"] = measure(BASE_DIR, items, args.batch_size, args.max_tokens, IMAGE_SIZE ** 2, args.repeats) | {
            "max_pixels": IMAGE_SIZE ** 2}

        catalog = load_catalog(ROOT / "data" / "entities.json")
        items = probe_items([(p, "cheburashka") for p in random_pictures(tmp, args.items)], catalog, args.items)
        for name, spec in RANDOM_MODELS.items():
            hf = build_tiny_qwen(tmp / f"{name}-hf", spec)
            model_dir = convert("tiny-4bit", hf_path=str(hf), out=tmp / f"{name}-4bit")
            result[name] = measure(model_dir, items, args.batch_size, args.max_tokens, 224 * 224, args.repeats) | {
                "max_pixels": 224 * 224}
    line = json.dumps(result, ensure_ascii=False)
    print(line)
    if args.save:
        (ROOT / "docs" / "bench_eval.json").write_text(line + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
