"""`cultvlm data check`: decode every image under `<images>/<entity_id>/` and report what would
trip training up -- unreadable files, tiny pictures, exact and near duplicates -- without
touching a single original.

Each file gets one status, the first that applies:

    unreadable: REASON        Pillow cannot decode it fully (empty, truncated, not an image,
                              over the decompression-bomb limit, float pixels), or its name is
                              not valid UTF-8 (shown with \\xNN escapes)
    too_small                 its shorter side is under --min-side
    duplicate_of: PATH        byte-identical (sha256) to an earlier file, in any entity
    near_duplicate_of: PATH   perceptual hash within --near-threshold bits of an earlier file
    ok

"Earlier" is the order of paths. Near-duplicates stay usable (a resized copy still teaches
something), but `build` keeps them in the same split as their original. Conversions the loader
does anyway (CMYK, palette, transparency, EXIF rotation, first frame of an animation) are notes.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import imagehash
import numpy as np
from PIL import Image

from ..errors import CultvlmError
from ..files import NOT_UTF8, printable, utf8_name
from ..images import load_image
from .catalog import Entity, load_catalog

DEFAULT_MIN_SIDE = 64
DEFAULT_MIN_IMAGES = 10
DEFAULT_NEAR_THRESHOLD = 6
# Per-entity metadata kept beside the images (`data collect` writes both), not images.
SIDECAR_FILES = {"sources.jsonl", "CREDITS.md"}
# Pillow's convert("RGB") clips float pixels to 0..255; the loader has no scale for them.
FLOAT_MODES = {"F"}
EXIF_ORIENTATION = 0x0112


@dataclass
class ImageRecord:
    path: str  # relative to the images root, '/'-separated
    entity: str
    sha256: str
    phash: str | None = None  # 64-bit perceptual hash (imagehash.phash), hex
    width: int | None = None  # as the loader delivers it (after EXIF rotation)
    height: int | None = None
    mode: str | None = None  # as stored in the file
    status: str = "ok"
    notes: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        """Goes into a dataset: ok, or a near-duplicate (kept in its original's split)."""
        return self.status == "ok" or self.status.startswith("near_duplicate_of")

    @property
    def problem(self) -> bool:
        return not self.usable


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def decode_strictly(path: Path) -> Image.Image:
    """`load_image` (full decode, EXIF rotation, RGB), also refusing images that Pillow only
    warns about (between its pixel limit and twice it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return load_image(path)
    except Image.DecompressionBombWarning as e:
        raise CultvlmError(f"{path}: refused, too many pixels ({e})") from None


def inspect_image(path: Path, rel: str, entity: str, min_side: int) -> ImageRecord:
    """Decode one file completely and describe it; never raises for a bad image."""
    record = ImageRecord(rel, entity, sha256_of(path))
    try:
        img = decode_strictly(path)
    except CultvlmError as e:
        record.status = "unreadable: " + e.message.removeprefix(f"{path}: ")
        return record
    with Image.open(path) as raw:  # the header only: what the file holds before conversion
        record.mode = raw.mode
        frames = getattr(raw, "n_frames", 1)
        orientation = raw.getexif().get(EXIF_ORIENTATION, 1)
        transparent = raw.mode in ("RGBA", "LA", "PA") or "transparency" in raw.info
    record.width, record.height = img.size
    if record.mode in FLOAT_MODES:
        record.status = f"unreadable: {record.mode} (float) pixels have no known range; save it as 8-bit"
        return record
    if record.mode.startswith("I"):
        record.notes.append(f"{record.mode} (16-bit) grey: scaled to 8 bits on load")
    elif record.mode == "CMYK":
        record.notes.append("CMYK: converted to RGB on load, colours may shift")
    elif transparent:
        record.notes.append(f"{record.mode} with transparency: put on white on load")
    elif record.mode not in ("RGB", "L"):
        record.notes.append(f"mode {record.mode}: converted to RGB on load")
    if frames > 1:
        record.notes.append(f"animated ({frames} frames): only the first frame is used")
    if orientation not in (None, 1):
        record.notes.append(f"EXIF orientation {orientation}: turned upright on load")
    record.phash = str(imagehash.phash(img))
    if min(img.size) < min_side:
        record.status = "too_small"
        record.notes.append(f"{img.width}x{img.height} is under the minimum side of {min_side}")
    return record


def hash_bits(records: list[ImageRecord]) -> np.ndarray:
    """[n, 64] bools, one row per record's perceptual hash."""
    packed = np.array([np.frombuffer(bytes.fromhex(r.phash), dtype=np.uint8) for r in records],
                      dtype=np.uint8).reshape(len(records), -1)
    return np.unpackbits(packed, axis=1).astype(bool)


def near_pairs(records: list[ImageRecord], threshold: int) -> list[tuple[int, int]]:
    """(i, j), i < j, for every two records whose perceptual hashes differ in at most
    `threshold` bits."""
    if len(records) < 2:
        return []
    bits = hash_bits(records)
    pairs = []
    for j in range(1, len(records)):
        close = np.nonzero((bits[:j] != bits[j]).sum(axis=1) <= threshold)[0]
        pairs.extend((int(i), j) for i in close)
    return pairs


def mark_duplicates(records: list[ImageRecord]) -> None:
    first_with = {}
    for r in records:
        if r.status != "ok":
            continue
        original = first_with.setdefault(r.sha256, r)
        if original is not r:
            r.status = f"duplicate_of: {original.path}"
            if original.entity != r.entity:
                r.notes.append(f"the same file is filed under {original.entity}: one of the two labels is wrong")


def mark_near_duplicates(records: list[ImageRecord], threshold: int) -> None:
    candidates = [r for r in records if r.status == "ok"]
    bits = hash_bits(candidates) if candidates else None
    marked = set()
    for i, j in near_pairs(candidates, threshold):
        if j in marked:  # pairs come by j, smallest i first: keep the earliest original
            continue
        marked.add(j)
        original, copy = candidates[i], candidates[j]
        copy.status = f"near_duplicate_of: {original.path}"
        copy.notes.append(f"perceptual hash {int((bits[i] != bits[j]).sum())} bit(s) away")
        if original.entity != copy.entity:
            copy.notes.append(f"near-duplicate of a picture under {original.entity}: check the labels")


def unknown_folder_message(folder: Path, catalog: dict[str, Entity]) -> str:
    close = difflib.get_close_matches(folder.name, list(catalog), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else "add it with `cultvlm data add` or rename the folder"
    return f"{folder}: folder name is not an entity id in the catalog ({hint})"


def check_images(images_root: str | Path, catalog: dict[str, Entity], min_side: int = DEFAULT_MIN_SIDE,
                 near_threshold: int = DEFAULT_NEAR_THRESHOLD) -> list[ImageRecord]:
    """One record per file under `<images_root>/<entity_id>/`, in path order, with its status.
    A folder that is not a catalog id is an error (all of them listed, each with the closest id)."""
    images_root = Path(images_root)
    if not images_root.is_dir():
        raise CultvlmError(f"{images_root}: no such folder (images go in {images_root}/<entity_id>/)")
    folders = sorted(p for p in images_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [unknown_folder_message(f, catalog) for f in folders if f.name not in catalog]
    if unknown:
        raise CultvlmError("; ".join(unknown))
    stray = sorted(p.name for p in images_root.iterdir() if p.is_file() and not p.name.startswith("."))
    if stray:
        click.echo(f"warning: {images_root}: ignored {len(stray)} file(s) outside entity folders "
                   f"({', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''})", err=True)
    records = []
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(images_root)
            if (not path.is_file() or any(part.startswith(".") for part in rel.parts)
                    or path.name in SIDECAR_FILES):
                continue
            if not utf8_name(rel):  # it could not be written to the manifest or a dataset line
                records.append(ImageRecord(printable(rel.as_posix()), folder.name, sha256_of(path),
                                           status=f"unreadable: {NOT_UTF8}"))
                continue
            records.append(inspect_image(path, rel.as_posix(), folder.name, min_side))
    mark_duplicates(records)
    mark_near_duplicates(records, near_threshold)
    return records


def write_manifest(path: Path, records: list[ImageRecord]) -> None:
    """One JSON line per file; written via a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def summarize(records: list[ImageRecord], catalog: dict[str, Entity], min_images: int) -> dict[str, dict]:
    """Per catalog entity: counts by outcome, and a warning when too few images are usable."""
    summary = {}
    for entity in catalog.values():
        mine = [r for r in records if r.entity == entity.id]
        usable = sum(r.usable for r in mine)
        row = {"role": entity.role, "images": len(mine), "ok": sum(r.status == "ok" for r in mine),
               "near_duplicates": sum(r.status.startswith("near_duplicate_of") for r in mine),
               "problems": sum(r.problem for r in mine), "usable": usable, "warning": None}
        if usable < min_images:
            row["warning"] = f"{usable} usable image(s), fewer than the minimum of {min_images}"
        summary[entity.id] = row
    return summary


def format_report(records: list[ImageRecord], summary: dict[str, dict], manifest: Path) -> str:
    width = max([len("entity")] + [len(e) for e in summary])
    lines = [f"{'entity':<{width}}  role     images     ok  near-dup  problems"]
    for entity_id, row in summary.items():
        lines.append(f"{entity_id:<{width}}  {row['role']:<7}  {row['images']:>6}  {row['ok']:>5}  "
                     f"{row['near_duplicates']:>8}  {row['problems']:>8}")
    problems = [r for r in records if r.problem]
    if problems:
        lines += ["", "problems (left out of datasets):"] + [f"  {r.path}: {r.status}" for r in problems]
    near = [r for r in records if r.usable and r.status != "ok"]
    if near:
        lines += ["", "near-duplicates (kept, always in their original's split):"]
        lines += [f"  {r.path}: {r.status}" for r in near]
    noted = [r for r in records if r.notes]
    if noted:
        lines += ["", "notes:"] + [f"  {r.path}: {'; '.join(r.notes)}" for r in noted]
    warned = [(e, row["warning"]) for e, row in summary.items() if row["warning"]]
    if warned:
        lines += ["", "warnings:"] + [f"  {e}: {w}" for e, w in warned]
    counts = Counter(r.status.split(":")[0] for r in records)
    lines += ["", f"{len(records)} file(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
              f"manifest written to {manifest}"]
    return "\n".join(lines)


@click.command("check")
@click.option("--images", "images_root", default="data/images", show_default=True,
              type=click.Path(file_okay=False), help="folder with one sub-folder per entity id")
@click.option("--catalog", default="data/entities.json", show_default=True, type=click.Path(dir_okay=False))
@click.option("--min-side", type=click.IntRange(min=1), default=DEFAULT_MIN_SIDE, show_default=True,
              help="images with a shorter side are too small")
@click.option("--min-images", type=click.IntRange(min=0), default=DEFAULT_MIN_IMAGES, show_default=True,
              help="warn about entities with fewer usable images")
@click.option("--near-threshold", type=click.IntRange(0, 64), default=DEFAULT_NEAR_THRESHOLD, show_default=True,
              help="most perceptual-hash bits (of 64) two near-duplicates may differ in")
@click.option("--manifest", type=click.Path(dir_okay=False), default=None,
              help="where to write the manifest [default: <images>/../manifest.jsonl]")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def command(images_root, catalog, min_side, min_images, near_threshold, manifest, as_json):
    """Decode every image, find duplicates and near-duplicates, write a manifest. Originals are
    never modified."""
    entities = load_catalog(catalog)
    records = check_images(images_root, entities, min_side, near_threshold)
    # Beside the images folder, not in it (normpath: `--images .` puts it in the parent folder).
    manifest = Path(manifest) if manifest else Path(os.path.normpath(Path(images_root) / "..")) / "manifest.jsonl"
    write_manifest(manifest, records)
    summary = summarize(records, entities, min_images)
    if as_json:
        click.echo(json.dumps({"images_root": str(images_root), "manifest": str(manifest), "entities": summary,
                               "records": [asdict(r) for r in records]}, ensure_ascii=False, indent=2))
    else:
        click.echo(format_report(records, summary, manifest))
