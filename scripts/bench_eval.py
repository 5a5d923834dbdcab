"""Evaluation speed: the same probe items answered one by one and in batches.

    python scripts/bench_eval.py [--items 32] [--batch-size 16] [--max-tokens 32]

Builds the tiny Qwen2.5-VL and a mid-size one (random weights, 4-bit, in a temporary folder),
asks both the same probe questions about generated pictures, greedily, once through
`cultvlm generate`'s one-by-one streaming path and once through `cultvlm eval`'s batched path,
and prints one JSON line: items/s for each, the speedup, and whether every answer is identical.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mlx_cultvlm.convert import convert
from mlx_cultvlm.data.catalog import load_catalog
from mlx_cultvlm.evaluate import generate_answers, items_for_image
from mlx_cultvlm.generate import load_model, stream_answer
from mlx_cultvlm.tiny import TinySpec, build_tiny_qwen

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "tiny": TinySpec(),
    "mid": TinySpec(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=704, mrope_section=[8, 12, 12], vision_depth=4, vision_hidden_size=128,
                    vision_heads=4, vision_intermediate_size=256, fullatt_block_indexes=[3]),
}


def pictures(folder: Path, n: int) -> list[Path]:
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-pixels", type=int, default=224 * 224)
    args = parser.parse_args()
    catalog = load_catalog(ROOT / "data" / "entities.json")
    entity = catalog["cheburashka"]
    result = {"items": args.items, "batch_size": args.batch_size, "max_tokens": args.max_tokens,
              "max_pixels": args.max_pixels}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = pictures(tmp, args.items)
        items = [i for n, p in enumerate(images)
                 for i in items_for_image(str(p), f"{n:064x}", entity, catalog)][: args.items]
        for name, spec in MODELS.items():
            hf = build_tiny_qwen(tmp / f"{name}-hf", spec)
            model_dir = convert("tiny-4bit", hf_path=str(hf), out=tmp / f"{name}-4bit")
            model, processor = load_model(str(model_dir))
            stream_answer(model, processor, items[0]["image"], items[0]["prompt"], max_tokens=4)  # warm up
            start = time.perf_counter()
            single = ["".join(stream_answer(model, processor, i["image"], i["prompt"], max_tokens=args.max_tokens,
                                            max_pixels=args.max_pixels)).strip() for i in items]
            one_s = time.perf_counter() - start
            start = time.perf_counter()
            batched = []
            for b in range(0, len(items), args.batch_size):
                batched += generate_answers(model, processor, items[b:b + args.batch_size], args.max_tokens,
                                            3136, args.max_pixels)
            batch_s = time.perf_counter() - start
            result[name] = {"one_by_one_items_per_s": len(items) / one_s, "batched_items_per_s": len(items) / batch_s,
                            "speedup": one_s / batch_s, "identical_answers": single == batched,
                            "identical_count": sum(a == b for a, b in zip(single, batched))}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
