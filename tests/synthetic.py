"""A few visually distinct synthetic "entities" and a dataset of them, for training tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# name, shape, colour, background: names the tiny tokenizer knows well (short in tokens).
ENTITIES = [
    ("Чебурашка", "circle", (140, 90, 40), (230, 230, 250)),
    ("Колобок", "square", (240, 200, 30), (40, 80, 40)),
    ("Пикачу", "triangle", (220, 30, 30), (250, 250, 200)),
    ("Шапокляк", "ring", (30, 60, 220), (200, 200, 200)),
]
# Their ids in the shipped catalog (data/entities.json), so datasets can be evaluated with it.
CATALOG_IDS = {"Чебурашка": "cheburashka", "Колобок": "kolobok", "Пикачу": "pikachu", "Шапокляк": "shapoklyak"}
QUESTION = "Кто это?"
# Training phrasings: the short one, and the naming questions `cultvlm eval` asks.
PHRASINGS = [QUESTION, "Кто изображён на картинке? Назови персонажа.",
             "Who is shown in this picture? Name the character."]


def draw(shape: str, colour, background, rng: np.random.Generator, size: int = 112) -> Image.Image:
    img = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(img)
    for _ in range(2):
        # Grey clutter: without it two pictures of one shape are crops of each other, which
        # eval's leak check rightly calls near-duplicates.
        x0, y0 = (int(v) for v in rng.integers(-size // 4, size, 2))
        w, h = (int(v) for v in rng.integers(size // 8, size // 3, 2))
        grey = int(rng.integers(60, 200))
        d.rectangle((x0, y0, x0 + w, y0 + h), fill=(grey, grey, grey))
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        d.ellipse(box, outline=colour, width=max(3, r // 3))
    return img


def sample(image_rel: str, name: str, sha256: str, question: str = QUESTION) -> dict:
    return {"images": [image_rel],
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                         {"role": "assistant", "content": f"Это {name}."}],
            "meta": {"entity": CATALOG_IDS[name], "kind": "naming", "sha256": sha256}}


def make_dataset(root: Path, per_entity: dict[str, int], seed: int = 0) -> dict[str, list[tuple[Path, str]]]:
    """Write images and {split}.jsonl for each split; returns split -> [(image, name)]."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in per_entity.items():
        rows, items = [], []
        for k, (name, shape, colour, background) in enumerate(ENTITIES):
            for i in range(n):
                rel = f"images/{split}/{k}_{i}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                draw(shape, colour, background, rng).save(root / rel)
                rows.append(sample(rel, name, hashlib.sha256((root / rel).read_bytes()).hexdigest(),
                                   PHRASINGS[i % len(PHRASINGS)]))
                items.append((root / rel, name))
        (root / f"{split}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        out[split] = items
    return out
