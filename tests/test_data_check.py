"""`cultvlm data check`: every kind of broken or awkward file, exact and near duplicates."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw, ImageOps

from mlx_cultvlm.data.catalog import load_catalog
from mlx_cultvlm.data.check import check_images, command
from mlx_cultvlm.errors import CultvlmError


def picture(seed: int, size: tuple[int, int] = (128, 96)) -> Image.Image:
    """A picture of its own: random ellipses and boxes in random colours, plus noise. Two seeds
    give perceptual hashes far apart (>= 12 bits of 64 over 300 seeds)."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 8))):
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        box = (x0, y0, x0 + int(rng.integers(w // 4, w // 1.5)), y0 + int(rng.integers(h // 4, h // 1.5)))
        shape = draw.ellipse if rng.integers(0, 2) else draw.rectangle
        shape(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    noisy = np.asarray(img) + rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def near_variant(img: Image.Image) -> Image.Image:
    """The same picture at 3/4 size, re-encoded as JPEG (quality 70)."""
    small = img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=70)
    return Image.open(io.BytesIO(buffer.getvalue()))


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def write_catalog(path: Path, targets: list[str], controls: list[str] = (), confusable: dict | None = None) -> Path:
    confusable = confusable or {}
    entities = [{"id": e, "names": {"ru": [f"Имя {e}"], "en": [f"Name {e}"]},
                 "facts": {"ru": [f"Факт о {e}."], "en": [f"A fact about {e}."]},
                 "role": role, "confusable_with": confusable.get(e, [])}
                for role, ids in (("target", targets), ("control", controls)) for e in ids]
    path.write_text(json.dumps({"entities": entities}, ensure_ascii=False), encoding="utf-8")
    return path


def tree_state(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def awkward_tree(tmp_path) -> tuple[Path, Path]:
    """images/{alpha,beta}/ with duplicates, near-duplicates and every kind of awkward file."""
    images = tmp_path / "images"
    a, b = images / "alpha", images / "beta"
    p1 = save(picture(1), a / "p1.png")
    (a / "p1_copy.png").write_bytes(p1.read_bytes())           # exact duplicate, same entity
    save(near_variant(picture(1)), a / "p1_small.jpg")          # near-duplicate, same entity
    (b / "p1_again.png").parent.mkdir(parents=True)
    (b / "p1_again.png").write_bytes(p1.read_bytes())          # exact duplicate, other entity
    save(picture(2), b / "p2.png")
    save(picture(3), a / "p3.png")
    save(near_variant(picture(3)), b / "p3_near.jpg")           # near-duplicate, other entity
    save(picture(4).convert("CMYK"), a / "cmyk.jpg")
    save(picture(5).convert("P", palette=Image.Palette.ADAPTIVE, colors=32), a / "palette.png", transparency=0)
    rgba = picture(6).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 128))
    save(rgba, a / "rgba.png")
    gray16 = (np.asarray(picture(7).convert("L")).astype(np.uint16) * 257)
    save(Image.fromarray(gray16), a / "deep.png")                # mode I;16
    frames = [picture(8 + i).convert("P") for i in range(3)]
    frames[0].save(a / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    save(Image.new("RGB", (1, 1), (200, 10, 10)), a / "tiny.png")
    jpeg = io.BytesIO()
    picture(11).save(jpeg, "JPEG", quality=90)
    (a / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (a / "empty.jpg").write_bytes(b"")
    (a / "text.jpg").write_text("this is not a picture\n")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees on load
    save(picture(12), a / "rotated.jpg", exif=exif, quality=92)
    (a / "sources.jsonl").write_text('{"file": "p1.png", "license": "CC0"}\n')  # sidecars, not images
    (a / "CREDITS.md").write_text("# Credits\n")
    (a / ".p9.jpg.partial").write_bytes(b"\xff\xd8")  # hidden: a download in progress
    catalog = write_catalog(tmp_path / "entities.json", ["alpha", "beta"])
    return images, catalog


def by_path(records):
    return {r.path: r for r in records}


def test_statuses_of_every_awkward_file(awkward_tree):
    images, catalog = awkward_tree
    before = tree_state(images)
    records = by_path(check_images(images, load_catalog(catalog)))
    assert tree_state(images) == before  # originals untouched

    assert records["alpha/p1.png"].status == "ok"
    assert records["alpha/p1_copy.png"].status == "duplicate_of: alpha/p1.png"
    assert records["beta/p1_again.png"].status == "duplicate_of: alpha/p1.png"
    assert any("alpha" in n for n in records["beta/p1_again.png"].notes)
    assert records["alpha/p1_small.jpg"].status == "near_duplicate_of: alpha/p1.png"
    assert records["beta/p3_near.jpg"].status == "near_duplicate_of: alpha/p3.png"
    assert any("under alpha" in n for n in records["beta/p3_near.jpg"].notes)

    assert records["alpha/cmyk.jpg"].status == "ok" and records["alpha/cmyk.jpg"].mode == "CMYK"
    assert any("CMYK" in n for n in records["alpha/cmyk.jpg"].notes)
    assert records["alpha/palette.png"].status == "ok"
    assert any("transparency" in n for n in records["alpha/palette.png"].notes)
    assert any("transparency" in n for n in records["alpha/rgba.png"].notes)
    assert records["alpha/deep.png"].status == "ok"
    assert any("16-bit" in n for n in records["alpha/deep.png"].notes)
    assert records["alpha/anim.gif"].status == "ok"
    assert any("3 frames" in n for n in records["alpha/anim.gif"].notes)
    assert records["alpha/tiny.png"].status == "too_small"
    assert records["alpha/truncated.jpg"].status.startswith("unreadable: ")
    assert records["alpha/empty.jpg"].status == "unreadable: empty file (0 bytes)"
    assert records["alpha/text.jpg"].status == "unreadable: not an image Pillow can read"
    rotated = records["alpha/rotated.jpg"]
    assert (rotated.width, rotated.height) == (96, 128)  # as the loader turns it
    assert any("orientation 6" in n for n in rotated.notes)
    # The distinct pictures are not near-duplicates of anything.
    for path in ("alpha/p3.png", "beta/p2.png", "alpha/cmyk.jpg", "alpha/rgba.png", "alpha/rotated.jpg"):
        assert records[path].status == "ok", path
    assert all(len(r.sha256) == 64 for r in records.values())
    assert all(len(r.phash) == 16 for r in records.values() if r.usable)


def test_near_threshold_is_the_max_hamming_distance(tmp_path):
    images = tmp_path / "images"
    for seed in range(3):
        save(picture(seed), images / "alpha" / f"{seed}.png")
    catalog = load_catalog(write_catalog(tmp_path / "entities.json", ["alpha"]))
    assert [r.status for r in check_images(images, catalog, near_threshold=6)] == ["ok"] * 3
    # At 64 bits every picture is "near" the first one.
    assert [r.status for r in check_images(images, catalog, near_threshold=64)] == [
        "ok", "near_duplicate_of: alpha/0.png", "near_duplicate_of: alpha/0.png"]


def crop(img: Image.Image, left: float = 0.0, top: float = 0.0, right: float = 0.0, bottom: float = 0.0) -> Image.Image:
    w, h = img.size
    return img.crop((round(w * left), round(h * top), w - round(w * right), h - round(h * bottom)))


# Derivatives Commons is full of: each is ~10-34 bits from its original by the plain hash.
DERIVATIVES = {
    "mirrored": lambda img: ImageOps.mirror(img),
    "10% off the right": lambda img: crop(img, right=0.1),
    "10% off the top and left": lambda img: crop(img, left=0.1, top=0.1),
    "5% off each side": lambda img: crop(img, 0.05, 0.05, 0.05, 0.05),
    "20% off the bottom": lambda img: crop(img, bottom=0.2),
    "mirrored, then 10% off the left": lambda img: crop(ImageOps.mirror(img), left=0.1),
    "cropped and shrunk to JPEG": lambda img: near_variant(crop(img, right=0.1, bottom=0.1)),
}


@pytest.mark.parametrize("derive", DERIVATIVES.values(), ids=DERIVATIVES.keys())
def test_mirror_images_and_crops_are_near_duplicates(tmp_path, derive):
    from mlx_cultvlm.data.check import perceptual_hashes

    for seed in range(5):
        original = picture(seed, size=(320, 240))
        plain = int(perceptual_hashes(original)[0]) ^ int(perceptual_hashes(derive(original))[0])
        images = tmp_path / f"s{seed}"
        save(original, images / "alpha" / "a.png")
        save(derive(original), images / "alpha" / "b.png")
        catalog = load_catalog(write_catalog(tmp_path / "entities.json", ["alpha"]))
        statuses = [r.status for r in check_images(images, catalog)]
        assert statuses == ["ok", "near_duplicate_of: alpha/a.png"], (seed, bin(plain).count("1"))


def test_distinct_pictures_are_not_near_duplicates_of_each_others_crops(tmp_path):
    """The mirror images and crops make more hashes to compare: 100 distinct pictures still pass."""
    images = tmp_path / "images"
    for seed in range(100):
        save(picture(seed, size=(160, 120)), images / "alpha" / f"{seed:03d}.png")
    catalog = load_catalog(write_catalog(tmp_path / "entities.json", ["alpha"]))
    assert [r.status for r in check_images(images, catalog)] == ["ok"] * 100


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    images = tmp_path / "images"
    save(picture(1, (100, 80)), images / "alpha" / "warned.png")   # 8000 px: over the limit, Pillow warns
    save(picture(2, (128, 96)), images / "alpha" / "refused.png")  # 12288 px: over twice it, Pillow refuses
    catalog = load_catalog(write_catalog(tmp_path / "entities.json", ["alpha"]))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    records = by_path(check_images(images, catalog))
    for path in ("alpha/warned.png", "alpha/refused.png"):
        assert records[path].status.startswith("unreadable: refused, too many pixels"), records[path].status


def test_unknown_folder_suggests_the_closest_id(tmp_path):
    images = tmp_path / "images"
    save(picture(1), images / "chebureshka" / "1.png")
    catalog = load_catalog(write_catalog(tmp_path / "entities.json", ["cheburashka", "kolobok"]))
    with pytest.raises(CultvlmError, match=r"chebureshka: folder name is not an entity id.*did you mean 'cheburashka'"):
        check_images(images, catalog)


def test_missing_images_folder_is_an_error(tmp_path):
    catalog = load_catalog(write_catalog(tmp_path / "entities.json", ["alpha"]))
    with pytest.raises(CultvlmError, match="no such folder"):
        check_images(tmp_path / "nowhere", catalog)


def test_cli_json_and_manifest(awkward_tree):
    images, catalog = awkward_tree
    result = CliRunner().invoke(command, ["--images", str(images), "--catalog", str(catalog), "--json",
                                          "--min-images", "8"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["entities"]["alpha"]["near_duplicates"] == 1
    assert report["entities"]["beta"]["problems"] == 1  # p1_again.png
    assert report["entities"]["beta"]["warning"].startswith("2 usable image(s)")
    manifest = images.parent / "manifest.jsonl"
    assert report["manifest"] == str(manifest)
    lines = [json.loads(x) for x in manifest.read_text(encoding="utf-8").splitlines()]
    files = sorted(str(p.relative_to(images).as_posix()) for p in images.rglob("*")
                   if p.is_file() and p.name not in ("sources.jsonl", "CREDITS.md") and not p.name.startswith("."))
    assert len(files) == 17
    assert sorted(x["path"] for x in lines) == files
    assert set(lines[0]) == {"path", "entity", "sha256", "phash", "width", "height", "mode", "status", "notes"}


def test_cli_table_and_custom_manifest(awkward_tree, tmp_path):
    images, catalog = awkward_tree
    manifest = tmp_path / "elsewhere" / "m.jsonl"
    result = CliRunner().invoke(command, ["--images", str(images), "--catalog", str(catalog),
                                          "--manifest", str(manifest)])
    assert result.exit_code == 0, result.output
    assert manifest.is_file() and not (images.parent / "manifest.jsonl").exists()
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith(("alpha", "beta"))}
    # entity role images ok near-dup problems
    assert rows["alpha"][1:] == ["target", "14", "8", "1", "5"]
    assert "beta: 2 usable image(s)" in result.stdout


def test_cli_unknown_folder_is_a_one_line_error(tmp_path):
    images = tmp_path / "images"
    save(picture(1), images / "kolobk" / "1.png")
    catalog = write_catalog(tmp_path / "entities.json", ["kolobok"])
    result = CliRunner().invoke(command, ["--images", str(images), "--catalog", str(catalog)])
    assert result.exit_code == 1
    assert "did you mean 'kolobok'?" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_ids_and_folders_in_nfd_are_read_as_their_nfc_id(tmp_path):
    """macOS and its zips may spell a Cyrillic name in NFD (е + combining diaeresis): the catalog's
    id and an image folder so spelled are the NFC id; an NFC and an NFD folder side by side
    (possible on Linux, one folder on macOS) are refused, naming both."""
    import unicodedata

    nfc, nfd = "алёша", unicodedata.normalize("NFD", "алёша")
    assert nfc != nfd
    catalog_path = tmp_path / "entities.json"
    catalog_path.write_text(json.dumps({"entities": [
        {"id": nfd, "names": {"ru": ["Алёша Попович"]}},
        {"id": "gena", "names": {"ru": ["Гена"]}, "confusable_with": [nfd]}]}, ensure_ascii=False), encoding="utf-8")
    catalog = load_catalog(catalog_path)
    assert list(catalog) == [nfc, "gena"] and catalog["gena"].confusable_with == [nfc]
    images = tmp_path / "images"
    save(picture(1), images / nfd / "a.png")
    save(picture(2), images / "gena" / "b.png")
    records = by_path(check_images(images, catalog))
    assert records[f"{nfd}/a.png"].entity == nfc and records[f"{nfd}/a.png"].status == "ok"
    save(picture(3), images / nfc / "c.png")
    with pytest.raises(CultvlmError, match=f"folders '{nfc}' and '{nfd}'|folders '{nfd}' and '{nfc}'"):
        check_images(images, catalog)
