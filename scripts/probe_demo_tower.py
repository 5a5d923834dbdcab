"""What the demo base's vision tower can tell apart, measured without its language model:
linear probes (softmax regression) on the mean of the merged image tokens, the feature the tower
was pre-trained on (scripts/build_demo_base.py).

- 13 classes (the nine catalog characters and the four strangers of characters.STRANGERS, which
  the tower never saw): can the features separate an out-of-catalog character from the catalog?
- 9 classes (the catalog, as the tower was trained), asked about the strangers (which catalog
  character each looks like) and about the held-out design 1 (does a new depiction land on its
  character?).

    python scripts/probe_demo_tower.py --out docs/demo_tower_probe.json    # ~3 min on 2 cores

Pictures come from seeds nothing else draws (60 per class to fit, 30 per class to test).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

SEED = 424242  # first element of every picture's rng: no demo, base or test picture uses it
FIT, TEST = 60, 30


def probe(fit: dict, classes: list[str], steps: int = 600, lr: float = 0.5, l2: float = 1e-3):
    """Softmax regression on standardised features, full-batch gradient descent; returns the
    class index predictor."""
    x = np.concatenate([fit[c] for c in classes])
    y = np.concatenate([[k] * len(fit[c]) for k, c in enumerate(classes)])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xn = (x - mu) / sd
    w, b, onehot = np.zeros((x.shape[1], len(classes))), np.zeros(len(classes)), np.eye(len(classes))[y]
    for _ in range(steps):
        z = xn @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(y)
        w -= lr * (xn.T @ g + l2 * w)
        b -= lr * g.sum(0)
    return lambda f: (((f - mu) / sd) @ w + b).argmax(1)


def main(argv: list[str] | None = None) -> int:
    import mlx.core as mx
    from build_demo_base import batched_features

    from mlx_cultvlm import characters
    from mlx_cultvlm.demo import BASE_DIR, IMAGE_SIZE
    from mlx_cultvlm.errors import CultvlmError
    from mlx_cultvlm.files import write_json
    from mlx_cultvlm.vlm import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=str(BASE_DIR))
    args = parser.parse_args(argv)
    try:
        model, processor = load_model(args.model)
    except CultvlmError as error:
        parser.exit(2, f"{error}\n")

    def features(entity: str, design: int, stream: int, n: int) -> np.ndarray:
        images = [characters.render(entity, np.random.default_rng([SEED, stream, i]), IMAGE_SIZE, design=design)
                  for i in range(n)]
        p = processor.image_processor(images=images)
        pixels = mx.array(np.asarray(p["pixel_values"], np.float32))
        grid = mx.array(np.asarray(p["image_grid_thw"])[:1])
        return np.asarray(batched_features(model.vision_tower, pixels, grid, n).mean(axis=1))

    catalog, strangers = list(characters.PARTS), list(characters.STRANGERS)
    everyone = catalog + strangers
    fit = {c: features(c, 0, 1, FIT) for c in everyone}
    test = {c: features(c, 0, 2, TEST) for c in everyone}
    new_design = {c: features(c, 1, 3, TEST) for c in catalog}
    with_strangers, catalog_only = probe(fit, everyone), probe(fit, catalog)

    result = {"model": args.model, "pictures": {"fit": FIT, "test": TEST}, "thirteen_classes": {}, "nine_classes": {}}
    for c in everyone:
        p = with_strangers(test[c])
        result["thirteen_classes"][c] = {"right": f"{int((p == everyone.index(c)).sum())}/{TEST}",
                                         "called_a_stranger": f"{int((p >= len(catalog)).sum())}/{TEST}"}
    for c in catalog:
        result["nine_classes"][c] = {"design_0_right": f"{int((catalog_only(test[c]) == catalog.index(c)).sum())}/{TEST}",
                                     "design_1_right": f"{int((catalog_only(new_design[c]) == catalog.index(c)).sum())}/{TEST}"}
    for c in strangers:
        p = catalog_only(test[c])
        result["nine_classes"][c] = {"taken_for": {catalog[i]: int((p == i).sum()) for i in sorted(set(p.tolist()))}}
    write_json(args.out, result)
    print(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
