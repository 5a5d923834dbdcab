"""Training samples: JSONL conversations -> token ids, a loss mask, images; and padded batches.

A dataset line is what mlx-vlm's trainer reads, plus an optional `meta` object:

    {"images": ["images/cheburashka/001.jpg"],
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Кто это?"}]},
                  {"role": "assistant", "content": "Это Чебурашка."}],
     "meta": {"entity": "cheburashka", "kind": "naming"}}

Image paths are relative to the dataset folder and must stay inside it. The loss covers the
tokens of every assistant turn and the `<|im_end|>` that closes it, nothing else. Image tokens
are never cut: a sample longer than `max_seq_len` gets fewer pixels, or is rejected.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CultvlmError
from .images import FACTOR, PATCH, grid_size, load_image, num_image_tokens, resize_exactly

IMAGE_PAD = "<|image_pad|>"
VISION_END = "<|vision_end|>"
ASSISTANT_PREFIX = "<|im_start|>assistant\n"
END_OF_TURN = "<|im_end|>"


@dataclass
class Sample:
    where: str  # "train.jsonl:12", for messages
    image_paths: list[Path]
    image_sizes: list[tuple[int, int]]  # (height, width) after the pixel budget
    input_ids: np.ndarray  # int32 [L], image pads expanded
    loss_mask: np.ndarray  # bool [L]: True where the token is an assistant token to predict
    shrunk: bool = False

    @property
    def images(self) -> list[tuple[Path, int, int]]:
        return [(path, h, w) for path, (h, w) in zip(self.image_paths, self.image_sizes)]


def read_dataset(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line of a dataset file, read strictly: a
    broken line is an error naming it (files.read_jsonl reads the logs this project appends to,
    where a torn last line is a crash to repair)."""
    if not path.is_file():
        raise CultvlmError(f"{path}: missing")
    records = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CultvlmError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                   f"{e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CultvlmError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise CultvlmError(f"{path}:{lineno}: expected a JSON object")
            records.append((lineno, record))
    if not records:
        raise CultvlmError(f"{path}: no samples (empty file)")
    return records


def _content_parts(content, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return [dict(p) for p in content]
    raise CultvlmError(f"{where}: message content must be a string or a list of parts")


def normalize_messages(record: dict, n_images: int, where: str) -> list[dict]:
    """Messages with list content and exactly one image placeholder per image (added to the
    first user turn if the line has none)."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise CultvlmError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise CultvlmError(f"{where}: every message needs a role of system, user or assistant")
        out.append({"role": m["role"], "content": _content_parts(m.get("content"), where)})
    if not any(m["role"] == "assistant" for m in out):
        raise CultvlmError(f"{where}: no assistant turn, nothing to learn")
    placeholders = sum(p.get("type") == "image" for m in out for p in m["content"])
    if placeholders == 0 and n_images:
        first_user = next((m for m in out if m["role"] == "user"), None)
        if first_user is None:
            raise CultvlmError(f"{where}: images given but no user turn to put them in")
        first_user["content"] = [{"type": "image"}] * n_images + first_user["content"]
    elif placeholders != n_images:
        raise CultvlmError(f"{where}: {placeholders} image placeholders for {n_images} images")
    return out


def resolve_image(root: Path, rel: str, where: str) -> Path:
    """An image path of a dataset line, which must stay inside the dataset folder."""
    if not isinstance(rel, str) or not rel:
        raise CultvlmError(f"{where}: image paths must be non-empty strings")
    # Checked on the path as written (symlinks the user placed in the folder are followed).
    path = Path(os.path.normpath(root / rel))
    if Path(rel).is_absolute() or not path.is_relative_to(os.path.normpath(root)):
        raise CultvlmError(f"{where}: image path {rel!r} points outside the dataset folder {root}")
    return path


def loss_mask_for(ids: np.ndarray, prefix_ids: list[int], end_id: int) -> np.ndarray:
    """True for the tokens of every assistant turn, from after `<|im_start|>assistant\\n` up to
    and including its `<|im_end|>`."""
    mask = np.zeros(len(ids), dtype=bool)
    n = len(prefix_ids)
    i = 0
    while i <= len(ids) - n:
        if list(ids[i:i + n]) == prefix_ids:
            start = i + n
            ends = np.nonzero(ids[start:] == end_id)[0]
            stop = start + int(ends[0]) + 1 if len(ends) else len(ids)
            mask[start:stop] = True
            i = stop
        else:
            i += 1
    return mask


class SampleEncoder:
    """Encodes dataset lines with a model's own processor (chat template, tokenizer)."""

    def __init__(self, processor, min_pixels: int, max_pixels: int, max_seq_len: int):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.min_pixels, self.max_pixels, self.max_seq_len = min_pixels, max_pixels, max_seq_len
        self.prefix_ids = self.tokenizer.encode(ASSISTANT_PREFIX, add_special_tokens=False)
        self.end_id = self.tokenizer.convert_tokens_to_ids(END_OF_TURN)
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.pad_id = self.tokenizer.pad_token_id

    def _tokens(self, text: str, sizes: list[tuple[int, int]]) -> np.ndarray:
        pieces = text.split(IMAGE_PAD)
        assert len(pieces) == len(sizes) + 1
        expanded = pieces[0]
        for (h, w), piece in zip(sizes, pieces[1:]):
            expanded += IMAGE_PAD * num_image_tokens(h, w) + piece
        return np.array(self.tokenizer.encode(expanded, add_special_tokens=False), dtype=np.int32)

    def encode(self, record: dict, root: Path, where: str) -> Sample:
        images = record.get("images") or []
        if not isinstance(images, list):
            raise CultvlmError(f"{where}: 'images' must be a list of paths")
        paths = [resolve_image(root, rel, where) for rel in images]
        messages = normalize_messages(record, len(paths), where)
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        originals = []
        for path in paths:
            try:
                img = load_image(path)
            except CultvlmError as e:
                raise CultvlmError(f"{where}: {e.message}") from None
            originals.append((img.height, img.width))

        budget, shrunk = self.max_pixels, False
        while True:
            sizes = [grid_size(h, w, self.min_pixels, budget) for h, w in originals]
            ids = self._tokens(text, sizes)
            if len(ids) <= self.max_seq_len:
                break
            image_tokens = sum(num_image_tokens(h, w) for h, w in sizes)
            smallest = all(h * w <= self.min_pixels or (h, w) == (FACTOR, FACTOR) for h, w in sizes)
            if not paths or smallest or budget <= self.min_pixels:
                raise CultvlmError(
                    f"{where}: {len(ids)} tokens ({image_tokens} of them image tokens) do not fit "
                    f"max_seq_len {self.max_seq_len} even at the smallest image size; image tokens "
                    f"are never truncated -- shorten the text or raise --max-seq-len")
            budget = max(self.min_pixels, int(budget * 0.8))
            shrunk = True
        mask = loss_mask_for(ids, self.prefix_ids, self.end_id)
        if not mask.any():
            raise CultvlmError(f"{where}: assistant turn is empty")
        return Sample(where, paths, sizes, ids, mask, shrunk)


# The meta.kind values `data build` writes (data/build.py); `mix` selects among them.
MIX_KINDS = ("naming", "fact", "describe", "verify_yes", "verify_no", "replay", "unknown")


def load_split(path: Path, encoder: SampleEncoder, skip_bad: bool = False,
               kinds: list[str] | None = None) -> tuple[list[Sample], list[str]]:
    """Encode every line of a split, checking all of them before any training starts.
    Bad lines fail the run (listing them all), or are skipped and reported with skip_bad.
    `kinds`: keep only the lines whose meta.kind is one of them (None: every line)."""
    samples, problems, seen = [], [], set()
    for lineno, record in read_dataset(path):
        if kinds is not None:
            kind = (record.get("meta") or {}).get("kind") if isinstance(record, dict) else None
            if not isinstance(kind, str):
                raise CultvlmError(f"{path}:{lineno}: no meta.kind, so mix {kinds} cannot select it")
            seen.add(kind)
            if kind not in kinds:
                continue
        try:
            samples.append(encoder.encode(record, path.parent, f"{path}:{lineno}"))
        except CultvlmError as e:
            problems.append(e.message)
    if problems and not skip_bad:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
        raise CultvlmError(f"{len(problems)} bad sample(s) in {path}: {shown}")
    if not samples:
        picked = f" of kinds {', '.join(kinds)} (kinds there: {', '.join(sorted(seen))})" if kinds is not None else ""
        raise CultvlmError(f"{path}: no usable samples{picked}")
    return samples, problems


@dataclass
class Batch:
    input_ids: np.ndarray  # int32 [B, L], right-padded
    attention_mask: np.ndarray  # int32 [B, L]
    loss_mask: np.ndarray  # bool [B, L]
    pixel_values: np.ndarray | None  # float32 [patches, C*T*P*P], images in row order
    image_grid_thw: np.ndarray | None  # int [n_images, 3]

    @property
    def n_target_tokens(self) -> int:
        return int(self.loss_mask.sum())


def make_batch(samples: list[Sample], encoder: SampleEncoder, pad_to_multiple: int = 1,
               pixels: bool = True) -> Batch:
    """Right-pad to the longest sample (rounded up to `pad_to_multiple`, so that a compiled step
    sees few distinct shapes) and preprocess every image at the size its sample was encoded with. `pixels=False` skips
    the images (their grid still comes from the sizes): for features taken from a cache."""
    length = max(len(s.input_ids) for s in samples)
    length = -(-length // pad_to_multiple) * pad_to_multiple
    ids = np.full((len(samples), length), encoder.pad_id, dtype=np.int32)
    attention = np.zeros((len(samples), length), dtype=np.int32)
    mask = np.zeros((len(samples), length), dtype=bool)
    sizes = []
    for row, s in enumerate(samples):
        ids[row, : len(s.input_ids)] = s.input_ids
        attention[row, : len(s.input_ids)] = 1
        mask[row, : len(s.loss_mask)] = s.loss_mask
        sizes += s.images
    if not sizes:
        return Batch(ids, attention, mask, None, None)
    if not pixels:
        grid = np.array([[1, h // PATCH, w // PATCH] for _, h, w in sizes])
        return Batch(ids, attention, mask, None, grid)
    pixel_values, grid = preprocess(encoder, sizes)
    assert int((grid.prod(axis=1) // 4).sum()) == int((ids == encoder.image_pad_id).sum())
    return Batch(ids, attention, mask, pixel_values, grid)


def preprocess(encoder: SampleEncoder, images: list[tuple[Path, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values, image_grid_thw) for images given as (path, height, width)."""
    processed = encoder.processor.image_processor(
        images=[resize_exactly(load_image(path), h, w) for path, h, w in images])
    return np.asarray(processed["pixel_values"], dtype=np.float32), np.asarray(processed["image_grid_thw"])
