"""`cultvlm data check`: decode every image under `<images>/<entity_id>/` and report what would
trip training up -- unreadable files, tiny pictures, exact and near duplicates -- without
touching a single original.

Each file gets one status, the first that applies:

    unreadable: REASON        Pillow cannot decode it fully (empty, truncated, not an image,
                              over the decompression-bomb limit, float pixels), or its name is
                              not valid UTF-8 (shown with \\xNN escapes)
    too_small                 its shorter side is under --min-side
    duplicate_of: PATH        byte-identical (sha256) to an earlier file, in any entity
    near_duplicate_of: PATH   perceptual hash within --near-threshold bits of an earlier file,
                              of its mirror image, or of a crop of either (see below)
    ok

"Earlier" is the order of paths. A mirrored copy is ~30 bits from its original by the plain
perceptual hash, a 10% crop 14-20, so each picture is also hashed mirrored and cropped: 5, 10 or
20% off its width, its height or both, at either edge or centred (`perceptual_hashes`). Two
pictures are near-duplicates when either one's plain hash is within the threshold of the other's,
or within the threshold less CROP_MARGIN (2) bits of the other's mirror image or of a crop:
flips, crops and flipped crops of those sizes are found (measured: within 4 bits on generated
pictures, while 435 pairs of distinct ones stayed 12 or more apart, and look-alike demo drawings
one feature apart 6; a 15% crop, between the windows, lands 6-12 bits away and is missed). Near-duplicates stay usable (a resized copy still teaches
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
from PIL import Image, ImageOps

from ..errors import CultvlmError
from ..files import NOT_UTF8, printable, utf8_name
from ..images import load_image
from .catalog import Entity, folder_id, load_catalog

DEFAULT_MIN_SIDE = 64
DEFAULT_MIN_IMAGES = 10
DEFAULT_NEAR_THRESHOLD = 6
# The share of the width, the height or both that a cropped copy may lack (see the docstring).
CROP_FRACTIONS = (0.05, 0.1, 0.2)
# A match through a mirror image or a crop must be this many bits closer than the threshold:
# flips and crops at the windows measured within 4 bits, while distinct look-alike pictures of
# the demo (the same body and palette, one feature apart) came to 6 through some crop.
CROP_MARGIN = 2
HASH_BASE_SIDE = 128  # pictures are hashed from a grey thumbnail this big: crops of it are cheap
# Per-entity metadata kept beside the images (`data collect` writes both), not images.
SIDECAR_FILES = {"sources.jsonl", "CREDITS.md"}
# Pillow's convert("RGB") clips float pixels to 0..255; the loader has no scale for them.
FLOAT_MODES = {"F"}
EXIF_ORIENTATION = 0x0112


NEGATIVES = "negatives"  # the path prefix of out-of-catalog pictures (`--negatives DIR`)


@dataclass
class ImageRecord:
    path: str  # relative to the images root, '/'-separated; "negatives/..." for an out-of-catalog picture
    entity: str | None  # None: a picture of no catalog entity (a negative)
    sha256: str
    phash: str | None = None  # 64-bit perceptual hash of the picture as it is, hex
    # uint64 perceptual hashes of the picture, its crops and its mirror image's (perceptual_hashes):
    # kept in memory for finding near-duplicates, not written to the manifest.
    hashes: np.ndarray | None = field(default=None, repr=False, compare=False)
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
    record.hashes = perceptual_hashes(img)
    record.phash = f"{int(record.hashes[0]):016x}"
    if min(img.size) < min_side:
        record.status = "too_small"
        record.notes.append(f"{img.width}x{img.height} is under the minimum side of {min_side}")
    return record


def crop_boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """The whole picture, then every crop of CROP_FRACTIONS off the width, the height or both,
    at either edge or centred."""
    boxes = [(0, 0, width, height)]
    for f in CROP_FRACTIONS:
        for fx, fy in ((f, 0), (0, f), (f, f)):
            dx, dy = round(width * fx), round(height * fy)
            boxes += [(x0, y0, x0 + width - dx, y0 + height - dy)
                      for x0 in sorted({0, dx // 2, dx}) for y0 in sorted({0, dy // 2, dy})]
    return boxes


def perceptual_hashes(img: Image.Image) -> np.ndarray:
    """uint64 [2 * len(crop_boxes)]: the perceptual hash of the picture (first), of its crops,
    then the same for its mirror image."""
    grey = img.convert("L")
    grey.thumbnail((HASH_BASE_SIDE, HASH_BASE_SIDE))
    return np.array([int(str(imagehash.phash(v.crop(box))), 16)
                     for v in (grey, ImageOps.mirror(grey)) for box in crop_boxes(*grey.size)], dtype=np.uint64)


def near_distances(plain: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """[len(plain), len(hashes)] bits between each plain hash and the closest of each picture's
    hashes (`perceptual_hashes` rows), a mirror image or crop counting CROP_MARGIN bits more."""
    bits = np.bitwise_count(plain[:, None, None] ^ hashes[None, :, :]).astype(np.int64)
    bits[:, :, 1:] += CROP_MARGIN
    return bits.min(axis=2)


def near_pairs(records: list[ImageRecord], threshold: int) -> list[tuple[int, int, int]]:
    """(i, j, bits), i < j, for every two records that are near-duplicates: either one's plain
    hash within `threshold` bits of any of the other's (mirror images and crops included)."""
    if len(records) < 2:
        return []
    hashes = np.stack([r.hashes for r in records])
    plain = hashes[:, 0]
    pairs = []
    for j in range(1, len(records)):
        bits = np.minimum(near_distances(plain[j:j + 1], hashes[:j])[0], near_distances(plain[:j], hashes[j:j + 1])[:, 0])
        pairs.extend((int(i), j, int(bits[i])) for i in np.nonzero(bits <= threshold)[0])
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
                r.notes.append(f"the same file is filed under {original.entity or NEGATIVES}: one of the two labels is wrong")


def mark_near_duplicates(records: list[ImageRecord], threshold: int) -> None:
    candidates = [r for r in records if r.status == "ok"]
    marked = set()
    for i, j, bits in near_pairs(candidates, threshold):
        if j in marked:  # pairs come by j, smallest i first: keep the earliest original
            continue
        marked.add(j)
        original, copy = candidates[i], candidates[j]
        copy.status = f"near_duplicate_of: {original.path}"
        copy.notes.append(f"perceptual hash {bits} bit(s) away (a mirror image or crop counts {CROP_MARGIN} more)")
        if original.entity != copy.entity:
            copy.notes.append(f"near-duplicate of a picture under {original.entity or NEGATIVES}: check the labels")


def unknown_folder_message(folder: Path, catalog: dict[str, Entity]) -> str:
    close = difflib.get_close_matches(folder.name, list(catalog), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else "add it with `cultvlm data add` or rename the folder"
    return f"{folder}: folder name is not an entity id in the catalog ({hint})"


def _files(folder: Path):
    """The files under `folder` that may be pictures, in path order."""
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts) and path.name not in SIDECAR_FILES:
            yield path, rel


def check_images(images_root: str | Path, catalog: dict[str, Entity], min_side: int = DEFAULT_MIN_SIDE,
                 near_threshold: int = DEFAULT_NEAR_THRESHOLD, negatives: str | Path | None = None) -> list[ImageRecord]:
    """One record per file under `<images_root>/<entity_id>/`, in path order, with its status,
    then one per file anywhere under `negatives` (pictures of no catalog entity; entity None,
    path "negatives/<path>"). Duplicates and near-duplicates are found across both. A folder
    that is not a catalog id is an error (all of them listed, each with the closest id)."""
    images_root = Path(images_root)
    if not images_root.is_dir():
        raise CultvlmError(f"{images_root}: no such folder (images go in {images_root}/<entity_id>/)")
    folders = sorted(p for p in images_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [unknown_folder_message(f, catalog) for f in folders if folder_id(f.name) not in catalog]
    if unknown:
        raise CultvlmError("; ".join(unknown))
    seen = {}
    for folder in folders:
        a, b = seen.setdefault(folder_id(folder.name), folder), folder
        if a is not b:  # possible on Linux, one folder on macOS
            raise CultvlmError(f"{images_root}: folders {a.name!r} and {b.name!r} are one id in two Unicode "
                               f"forms (NFC and NFD): move the pictures into one of them")
    stray = sorted(p.name for p in images_root.iterdir() if p.is_file() and not p.name.startswith("."))
    if stray:
        click.echo(f"warning: {images_root}: ignored {len(stray)} file(s) outside entity folders "
                   f"({', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''})", err=True)
    if negatives is not None and not Path(negatives).is_dir():
        raise CultvlmError(f"{negatives}: no such folder (of pictures of no catalog entity, for --negatives)")
    sources = [(folder, folder.name, folder_id(folder.name)) for folder in folders]
    if negatives is not None:
        sources.append((Path(negatives), NEGATIVES, None))
    records = []
    for folder, prefix, entity in sources:
        for path, rel in _files(folder):
            name = f"{prefix}/{rel.as_posix()}"
            if not utf8_name(rel):  # it could not be written to the manifest or a dataset line
                records.append(ImageRecord(printable(name), entity, sha256_of(path), status=f"unreadable: {NOT_UTF8}"))
                continue
            records.append(inspect_image(path, name, entity, min_side))
    mark_duplicates(records)
    mark_near_duplicates(records, near_threshold)
    return records


def manifest_line(record: ImageRecord) -> dict:
    return {k: v for k, v in asdict(record).items() if k != "hashes"}


def write_manifest(path: Path, records: list[ImageRecord]) -> None:
    """One JSON line per file; written via a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(manifest_line(r), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def summarize(records: list[ImageRecord], catalog: dict[str, Entity], min_images: int) -> dict[str, dict]:
    """Per catalog entity (and the negatives, if any): counts by outcome, and a warning when too
    few images are usable."""
    summary = {}
    groups = [(e.id, e.role, e.id) for e in catalog.values()]
    if any(r.entity is None for r in records):
        groups.append((NEGATIVES, "negative", None))
    for name, role, entity in groups:
        mine = [r for r in records if r.entity == entity]
        usable = sum(r.usable for r in mine)
        row = {"role": role, "images": len(mine), "ok": sum(r.status == "ok" for r in mine),
               "near_duplicates": sum(r.status.startswith("near_duplicate_of") for r in mine),
               "problems": sum(r.problem for r in mine), "usable": usable, "warning": None}
        if usable < min_images:
            row["warning"] = f"{usable} usable image(s), fewer than the minimum of {min_images}"
        summary[name] = row
    return summary


def format_report(records: list[ImageRecord], summary: dict[str, dict], manifest: Path) -> str:
    width = max([len("entity")] + [len(e) for e in summary])
    lines = [f"{'entity':<{width}}  role      images     ok  near-dup  problems"]
    for entity_id, row in summary.items():
        lines.append(f"{entity_id:<{width}}  {row['role']:<8}  {row['images']:>6}  {row['ok']:>5}  "
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
@click.option("--negatives", type=click.Path(file_okay=False), default=None,
              help="a folder of pictures of no catalog entity (checked too, against the rest)")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def command(images_root, catalog, min_side, min_images, near_threshold, manifest, negatives, as_json):
    """Decode every image, find duplicates and near-duplicates, write a manifest. Originals are
    never modified."""
    entities = load_catalog(catalog)
    records = check_images(images_root, entities, min_side, near_threshold, negatives)
    # Beside the images folder, not in it (normpath: `--images .` puts it in the parent folder).
    manifest = Path(manifest) if manifest else Path(os.path.normpath(Path(images_root) / "..")) / "manifest.jsonl"
    write_manifest(manifest, records)
    summary = summarize(records, entities, min_images)
    if as_json:
        click.echo(json.dumps({"images_root": str(images_root), "manifest": str(manifest), "entities": summary,
                               "records": [manifest_line(r) for r in records]}, ensure_ascii=False, indent=2))
    else:
        click.echo(format_report(records, summary, manifest))


# -- what a model was trained on ---------------------------------------------------------------
# `lora` writes it beside the adapters (and `fuse` into the fused model): the sha256 and the
# perceptual hashes of every training picture, so that `eval` can refuse to test a model on
# pictures it was trained on, or on near-duplicates of them, whichever dataset they come from.
TRAINED_ON = "training_pictures.json"


def hashes_text(hashes: np.ndarray) -> str:
    return "".join(f"{int(h):016x}" for h in hashes)


def hashes_of_text(text: str) -> np.ndarray:
    return np.array([int(text[i:i + 16], 16) for i in range(0, len(text), 16)], dtype=np.uint64)


def training_record(paths, earlier: dict | None = None) -> dict:
    """The record of the pictures at `paths` (and of those an `earlier` record names: a base
    that was itself trained by cultvlm)."""
    pictures = dict((earlier or {}).get("pictures", {}))
    for path in dict.fromkeys(Path(p) for p in paths):
        pictures.setdefault(sha256_of(path), hashes_text(perceptual_hashes(load_image(path))))
    return {"near_threshold": DEFAULT_NEAR_THRESHOLD, "pictures": pictures}


def read_training_record(folder: Path) -> dict | None:
    """A model or adapter folder's record of its training pictures, or None if it has none."""
    path = Path(folder) / TRAINED_ON
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not (isinstance(record.get("pictures"), dict) and isinstance(record.get("near_threshold"), int)
                and all(isinstance(v, str) and len(v) % 16 == 0 for v in record["pictures"].values())):
            raise ValueError("needs near_threshold and pictures {sha256: hashes}")
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise CultvlmError(f"{path}: unreadable ({e}); it lists the pictures the model was trained on -- "
                           f"restore it from the training run's folder") from None
    return record


def trained_on(pictures: dict[str, Path], record: dict) -> dict[str, str]:
    """Of `pictures` (sha256 -> path), those the record's model was trained on, each with why:
    the same file, or a near-duplicate (mirror images and crops included) of a training picture."""
    found = {sha: "a training picture" for sha in pictures if sha in record["pictures"]}
    rest = [sha for sha in pictures if sha not in found]
    if not rest or not record["pictures"]:
        return found
    trained = np.stack([hashes_of_text(h) for h in record["pictures"].values()])
    for sha in rest:
        mine = perceptual_hashes(load_image(pictures[sha]))
        bits = min(int(near_distances(mine[:1], trained).min()), int(near_distances(trained[:, 0], mine[None])[:, 0].min()))
        if bits <= record["near_threshold"]:
            found[sha] = f"a near-duplicate ({bits} bits) of a training picture"
    return found
