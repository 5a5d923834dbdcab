"""Parameter counts and weight memory of the real Qwen2.5-VL 3B/7B, per part and precision.

Builds each architecture with mlx-vlm's own model classes and never evaluates the random
weights (MLX is lazy), so it needs no download and almost no memory. Writes JSON to stdout.
Used for docs/CONVERT.md (should the vision tower be quantized?).
"""

import json

from mlx.utils import tree_flatten
from mlx_cultvlm.models import build_random_model, real_config

GIB = 1024**3


def bytes_at(params: int, bits: int, group_size: int = 64) -> float:
    """Weights plus one bf16 scale and bias per group when quantized."""
    return params * 2 if bits == 16 else params * bits / 8 + params / group_size * 4


def main():
    report = {}
    for size in ("3b", "7b"):
        model = build_random_model(real_config(size))
        parts = {"vision": 0, "language_matrices": 0, "language_other": 0}
        for name, p in tree_flatten(model.parameters()):
            if name.startswith("vision_tower."):
                parts["vision"] += p.size
            elif p.ndim == 2:
                parts["language_matrices"] += p.size
            else:
                parts["language_other"] += p.size
        total = sum(parts.values())
        report[size] = {
            "params": parts | {"total": total},
            "GiB": {
                "vision_bf16": bytes_at(parts["vision"], 16) / GIB,
                "vision_4bit": bytes_at(parts["vision"], 4) / GIB,
                "language_4bit": (bytes_at(parts["language_matrices"], 4)
                                  + bytes_at(parts["language_other"], 16)) / GIB,
                "language_bf16": bytes_at(parts["language_matrices"] + parts["language_other"], 16) / GIB,
            },
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
