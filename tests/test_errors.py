"""Bad input, case by case, through the real CLI: the catalogue in scripts/errors_doc.py (which
also writes docs/ERRORS.md) says what each input gets; this module sets each one up and checks
the exit code, the output lines, that no traceback escapes, and that nothing already there is
lost."""

from __future__ import annotations

import base64
import errno
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import mlx_cultvlm
from conftest import make_image
from mlx_cultvlm.cli import main
from mlx_cultvlm.data.caption import caption_images
from mlx_cultvlm.data.catalog import Entity, save_catalog
from mlx_cultvlm.images import load_image
from synthetic import make_dataset
from test_data_caption import CREDENTIAL, TOKEN, gigachat  # noqa: F401  (a fixture: the fake GigaChat)
from test_data_check import picture
from test_data_collect import commons  # noqa: F401  (a fixture: the fake Wikimedia Commons)

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("errors_doc", ROOT / "scripts" / "errors_doc.py")
errors_doc = sys.modules["errors_doc"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(errors_doc)
CASES = errors_doc.CASES
NON_UTF8 = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes, as a name made on another system


@pytest.fixture(autouse=True)
def workspace(tmp_path, monkeypatch) -> Path:
    """Each case runs in a folder of its own, without real GigaChat or Commons settings."""
    for key in list(os.environ):
        if key.startswith("GIGACHAT_") or key == "CULTVLM_COMMONS_ENDPOINT":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------- the harness

@dataclass
class Run:
    """What a setup hands the harness: values for `<name>` placeholders, the environment, and
    checks to run afterwards (given the workspace and the CliRunner result)."""
    placeholders: dict = field(default_factory=dict)
    env: dict | None = None
    after: Callable | None = None


SETUPS: dict[str, Callable] = {}


def setup(*case_ids):
    def register(fn):
        for case_id in case_ids:
            SETUPS[case_id] = fn
        return fn
    return register


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every regular file under `root` (symlinks are not followed)."""
    state = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder, name)
            if path.is_file() and not path.is_symlink():
                state[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def fill(text: str, placeholders: dict) -> str:
    return re.sub(r"<(\w+)>", lambda m: placeholders.get(m.group(1), m.group(0)), text)


def line_matches(line: str, pattern: str) -> bool:
    """The whole (stripped) line, with `…` matching any text."""
    regex = ".*".join(re.escape(piece) for piece in pattern.split("…"))
    return re.fullmatch(regex, line.strip()) is not None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, workspace, request):
    run = SETUPS[case.id](workspace, request, case) or Run()
    before = snapshot(workspace)
    args = [fill(a, run.placeholders) for a in case.args]
    result = CliRunner().invoke(main, args, env=run.env, prog_name="cultvlm")
    output = result.output
    # Each stream on its own: a progress bar's closing newline on stderr may reach the mixed
    # `output` after what stdout printed next.
    lines = result.stdout.splitlines() + result.stderr.splitlines()

    assert "Traceback" not in output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == case.exit, output
    for pattern in case.expect:
        assert any(line_matches(line, fill(pattern, run.placeholders)) for line in lines), \
            f"no line like {pattern!r} in:\n{output}"
    errors = [line for line in lines if line.startswith("Error:")]
    if case.exit:
        # One line, naming the file or setting; it is the last thing printed.
        assert len(errors) == 1, output
        assert [p for p in case.expect if p.startswith("Error: ")], "a failing case shows its Error line"
        assert result.stderr.strip().splitlines()[-1] == errors[0]
    else:
        assert errors == [], output

    after = snapshot(workspace)
    changed = [p for p, digest in before.items() if p not in case.changes and after.get(p) != digest]
    assert changed == [], f"files changed or lost: {changed}"
    if run.after:
        run.after(workspace, result)


def test_every_case_has_a_setup_and_every_setup_a_case():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert sorted(SETUPS) == sorted(ids)
    assert len(CASES) >= 20


def test_errors_doc_is_generated_from_the_cases():
    """docs/ERRORS.md is exactly what the table renders: `python scripts/errors_doc.py` after a change."""
    assert (ROOT / "docs" / "ERRORS.md").read_text(encoding="utf-8") == errors_doc.render()
    assert errors_doc.main(["--check"]) == 0


# ---------------------------------------------------------------- building blocks

def write_catalog(ws: Path) -> Path:
    path = ws / "data" / "entities.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_catalog(path, {
        "gena": Entity("gena", {"ru": ["Крокодил Гена"], "en": ["Gena the Crocodile"]},
                       {"ru": ["Работает в зоопарке."], "en": ["Works at a zoo."]}),
        "cheburashka": Entity("cheburashka", {"ru": ["Чебурашка"], "en": ["Cheburashka"]},
                              {"ru": ["Зверёк с большими ушами."], "en": ["A creature with big ears."]}),
    })
    return path


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def jpeg_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png() -> bytes:
    """A 1-bit PNG header claiming 20000 x 20000 pixels, with a few rows of data: 100 bytes."""
    header = struct.pack(">IIBBBBB", 20000, 20000, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 2501 * 4)) + png_chunk(b"IEND", b""))


def heic_header() -> bytes:
    """The start of an iPhone photo: an ISO-BMFF 'ftyp' box with brand heic, then a meta box."""
    ftyp = struct.pack(">I", 24) + b"ftypheic" + struct.pack(">I", 0) + b"mif1heic"
    return ftyp + struct.pack(">I", 40) + b"meta" + bytes(32)


def palette_png(path: Path) -> Path:
    img = picture(5).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return save(img, path, transparency=0)


def animation(path: Path, first_seed: int, **kwargs) -> Path:
    frames = [picture(first_seed + i) for i in range(3)]
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, **kwargs)
    return path


def grey16(path: Path) -> Path:
    values = np.asarray(picture(4).convert("L"), dtype=np.uint16) * 257  # the full 16-bit range
    return save(Image.fromarray(values), path)


def exif_rotated(path: Path) -> Path:
    img = picture(12)  # 128 x 96, stored sideways: a viewer shows it 96 x 128
    exif = img.getexif()
    exif[0x0112] = 6
    return save(img, path, exif=exif)


def write_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def truncated_jpeg() -> bytes:
    data = jpeg_bytes(picture(2))
    return data[: len(data) // 2]


BAD_FILES = {  # name -> writer(path)
    "broken.jpg": lambda p: write_file(p, truncated_jpeg()),
    "empty.jpg": lambda p: write_file(p, b""),
    "notes.jpg": lambda p: write_file(p, b"shopping list: apples, oranges\n"),
    "cmyk.jpg": lambda p: save(picture(3).convert("CMYK"), p),
    "grey16.png": grey16,
    "palette.png": palette_png,
    "anim.gif": lambda p: animation(p, 6),
    "anim.webp": lambda p: animation(p, 9, lossless=True),
    "dot.png": lambda p: save(Image.new("RGB", (1, 1), (200, 30, 30)), p),
    "bomb.png": lambda p: write_file(p, bomb_png()),
    "photo.jpg": exif_rotated,
    "IMG_0001.heic": lambda p: write_file(p, heic_header()),
    NON_UTF8: lambda p: write_file(p, jpeg_bytes(picture(13))),
}


def manifest(ws: Path) -> dict[str, dict]:
    lines = (ws / "data" / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return {r["path"]: r for r in map(json.loads, lines)}


def link_model(ws: Path, request) -> None:
    (ws / "models").mkdir(exist_ok=True)
    (ws / "models" / "tiny-4bit").symlink_to(request.getfixturevalue("tiny_4bit"))


def link_hf(ws: Path, request) -> None:
    (ws / "hf").mkdir(exist_ok=True)
    (ws / "hf" / "tiny").symlink_to(request.getfixturevalue("tiny_hf"))


def dataset_line(image: str, entity: str) -> dict:
    return {"images": [image],
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Кто это?"}]},
                         {"role": "assistant", "content": "Это Гена."}],
            "meta": {"entity": entity, "kind": "naming"}}


def write_lines(path: Path, records: list[dict], tail: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode() + tail)
    return path


RUN_YAML = """model: tiny-4bit
models_dir: models
data: ds
out: adapters/run
steps: {steps}
save_every: 1
val_every: 2
batch_size: 2
max_pixels: 12544
rank: 4
"""


def small_training_setup(ws: Path, request, steps: int) -> None:
    link_model(ws, request)
    make_dataset(ws / "ds", {"train": 1, "valid": 1})
    (ws / "run.yaml").write_text(RUN_YAML.format(steps=steps), encoding="utf-8")


def short_writes(monkeypatch) -> None:
    """A full disk as MLX meets it: mx.save_safetensors(path, ...) writes part of the file and
    reports nothing (see test_mlx_reports_a_full_disk_only_through_a_python_file); through a
    Python file object the write fails with ENOSPC."""
    real = mx.save_safetensors

    def save_safetensors(file, arrays, *args, **kwargs):
        if not isinstance(file, (str, os.PathLike)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(file, arrays, *args, **kwargs)
        path = Path(file)
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)

    monkeypatch.setattr(mx, "save_safetensors", save_safetensors)


# ---------------------------------------------------------------- setups: image files

@setup("truncated_jpeg_generate", "zero_byte_generate", "text_as_jpg_generate", "bomb_generate", "heic_generate")
def bad_file_to_generate(ws, request, case):
    name = case.args[1]
    BAD_FILES[name](ws / name)

    def after(ws, result):
        assert not (ws / "data").exists()
    return Run(after=after)


@setup("truncated_jpeg_check", "text_as_jpg_check", "cmyk_jpeg_check", "png16_check", "palette_transparency_check",
       "animated_gif_check", "animated_webp_check", "one_pixel_check", "bomb_check", "exif_rotated_check",
       "heic_check", "non_utf8_name_check")
def bad_file_in_entity_folder(ws, request, case):
    write_catalog(ws)
    folder = ws / "data" / "images" / "gena"
    save(picture(1), folder / "ok.png")
    name = {"truncated_jpeg_check": "broken.jpg", "text_as_jpg_check": "notes.jpg", "cmyk_jpeg_check": "cmyk.jpg",
            "png16_check": "grey16.png", "palette_transparency_check": "palette.png",
            "animated_gif_check": "anim.gif", "animated_webp_check": "anim.webp", "one_pixel_check": "dot.png",
            "bomb_check": "bomb.png", "exif_rotated_check": "photo.jpg", "heic_check": "IMG_0001.heic",
            "non_utf8_name_check": NON_UTF8}[case.id]
    path = BAD_FILES[name](folder / name)

    def after(ws, result):
        records = manifest(ws)  # written, valid UTF-8 JSON lines, one per file
        assert len(records) == 2 and records["gena/ok.png"]["status"] == "ok"
        if case.id == "png16_check":  # scaled by the 16-bit range, not clipped to white
            expected = np.asarray(picture(4).convert("L"), dtype=np.int16)
            assert np.abs(np.asarray(load_image(path))[..., 0] - expected).max() <= 1
        if case.id == "palette_transparency_check":
            transparent = np.asarray(Image.open(path)) == 0
            assert transparent.any() and (np.asarray(load_image(path))[transparent] == 255).all()
        if case.id == "exif_rotated_check":
            assert (records["gena/photo.jpg"]["width"], records["gena/photo.jpg"]["height"]) == (96, 128)
        if case.id == "non_utf8_name_check":
            assert records["gena/caf\\xe9.jpg"]["status"].startswith("unreadable: file name")
    return Run(after=after)


@setup("zero_byte_add", "non_utf8_name_add")
def bad_file_to_add(ws, request, case):
    write_catalog(ws)
    save(picture(1), ws / "incoming" / "ok.jpg")
    name = "empty.jpg" if case.id == "zero_byte_add" else NON_UTF8
    BAD_FILES[name](ws / "incoming" / name)

    def after(ws, result):
        assert os.listdir(ws / "data" / "images" / "gena") == ["ok.jpg"]
    return Run(after=after)


@setup("non_utf8_name_caption")
def bad_name_to_caption(ws, request, case):
    write_catalog(ws)
    save(picture(1), ws / "data" / "images" / "gena" / "ok.jpg")
    BAD_FILES[NON_UTF8](ws / "data" / "images" / "gena" / NON_UTF8)

    def after(ws, result):
        (record,) = map(json.loads, (ws / "data" / "captions.jsonl").read_text(encoding="utf-8").splitlines())
        assert record["image"] == "gena/ok.jpg"
    return Run(after=after)


@setup("non_utf8_name_eval")
def bad_name_to_probe(ws, request, case):
    link_model(ws, request)
    write_catalog(ws)
    save(picture(1), ws / "probe" / "gena" / "ok.jpg")
    BAD_FILES[NON_UTF8](ws / "probe" / "gena" / NON_UTF8)

    def after(ws, result):
        lines = (ws / "runs" / "probe" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
        assert lines and {json.loads(line)["image"] for line in lines} == {"probe/gena/ok.jpg"}
    return Run(after=after)


# ---------------------------------------------------------------- setups: datasets, captions, catalog

@setup("path_escape_eval", "unknown_entity_eval", "empty_split_eval")
def bad_test_split(ws, request, case):
    write_catalog(ws)
    save(picture(1), ws / "ds" / "images" / "a.png")
    records = {"path_escape_eval": [dataset_line("../../etc/passwd", "gena")],
               "unknown_entity_eval": [dataset_line("images/a.png", "nobody")],
               "empty_split_eval": []}[case.id]
    write_lines(ws / "ds" / "test.jsonl", records)

    def after(ws, result):
        assert not (ws / "runs").exists()
    return Run(after=after)


@setup("path_escape_lora", "torn_dataset_lora")
def bad_train_split(ws, request, case):
    small_training_setup(ws, request, steps=1)
    train = ws / "ds" / "train.jsonl"
    records = [json.loads(line) for line in train.read_text(encoding="utf-8").splitlines()]
    if case.id == "path_escape_lora":
        records[0]["images"] = ["../../etc/passwd"]
        write_lines(train, records)
    else:
        write_lines(train, records, tail=json.dumps(records[0], ensure_ascii=False).encode()[:60])

    def after(ws, result):
        assert not (ws / "adapters" / "run" / "adapters.safetensors").exists()
        assert not (ws / "adapters" / "run" / "checkpoint").exists()
    return Run(after=after)


def images_for_captions(ws: Path) -> None:
    write_catalog(ws)
    make_image(ws / "data" / "images" / "gena" / "a.jpg", 64, 48, seed=1)
    make_image(ws / "data" / "images" / "gena" / "b.jpg", 64, 48, seed=2)
    caption_images(ws / "data" / "images", ws / "data" / "entities.json", ws / "data" / "captions.jsonl",
                   provider="offline", limit=1)


@setup("torn_captions_caption")
def torn_captions(ws, request, case):
    images_for_captions(ws)
    captions = ws / "data" / "captions.jsonl"
    whole = captions.read_bytes()
    with open(captions, "ab") as f:
        f.write('{"sha256": "ab12", "entity": "gena", "caption": "Это Кр'.encode())  # cut mid-character

    def after(ws, result):
        data = captions.read_bytes()
        assert data.startswith(whole)
        records = [json.loads(line) for line in data.decode("utf-8").splitlines()]
        assert [r["image"] for r in records] == ["gena/a.jpg", "gena/b.jpg"]
    return Run(after=after)


@setup("torn_captions_build")
def torn_captions_for_build(ws, request, case):
    write_catalog(ws)
    folder = ws / "data" / "images" / "gena"
    for i in range(6):
        save(picture(20 + i), folder / f"p{i}.png")
    first, second = (hashlib.sha256((folder / f"p{i}.png").read_bytes()).hexdigest() for i in range(2))
    lines = [{"sha256": sha, "entity": "gena", "lang": "ru", "caption": text, "flagged": False}
             for sha, text in ((first, "Крокодил Гена в шляпе."), (second, "Гена играет на гармошке."))]
    write_lines(ws / "data" / "captions.jsonl", lines,
                tail='{"sha256": "ab12", "entity": "gena", "caption": "Это Кр'.encode()[:-1])

    def after(ws, result):
        out = ws / "datasets" / "culture"
        described = [json.loads(line) for split in ("train", "valid", "test")
                     for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        assert sum(line["meta"]["kind"] == "describe" for line in described) == 2
    return Run(after=after)


@setup("catalog_syntax_check")
def broken_catalog(ws, request, case):
    write_file(ws / "data" / "entities.json", '{"entities": [\n  {"id": "gena", "names": {"ru": ["Гена"]}}\n'
               '  {"id": "cheburashka", "names": {"ru": ["Чебурашка"]}}\n]}\n'.encode())
    save(picture(1), ws / "data" / "images" / "gena" / "ok.png")

    def after(ws, result):
        assert not (ws / "data" / "manifest.jsonl").exists()
    return Run(after=after)


@setup("duplicate_ids_add")
def duplicate_ids(ws, request, case):
    entity = {"id": "gena", "names": {"ru": ["Гена"]}}
    write_file(ws / "data" / "entities.json", json.dumps({"entities": [entity, entity]}).encode())
    save(picture(1), ws / "incoming" / "ok.jpg")

    def after(ws, result):
        assert not (ws / "data" / "images").exists()
    return Run(after=after)


@setup("unknown_folder_check")
def misspelt_folder(ws, request, case):
    write_catalog(ws)
    save(picture(1), ws / "data" / "images" / "gnea" / "ok.png")

    def after(ws, result):
        assert not (ws / "data" / "manifest.jsonl").exists()
    return Run(after=after)


# ---------------------------------------------------------------- setups: models, adapters, saving

@setup("foreign_adapter_generate")
def adapter_from_another_base(ws, request, case):
    link_model(ws, request)
    make_image(ws / "photo.jpg")
    folder = ws / "adapters" / "from-3b"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": -1,
        "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 2.0,
                            "keys": ["language_model.model.layers.0.self_attn.q_proj"]},
        "base_model": {"model": "Qwen/Qwen2.5-VL-3B-Instruct", "hidden_size": 2048, "num_hidden_layers": 36,
                       "vocab_size": 151936, "vision_hidden_size": 1280,
                       "quantization": {"bits": 4, "group_size": 64}}}), encoding="utf-8")
    mx.save_safetensors(str(folder / "adapters.safetensors"), {"lora_a": mx.zeros((2048, 8))})


@setup("group_size_48_convert", "group_size_128_convert")
def group_sizes(ws, request, case):
    link_hf(ws, request)

    def after(ws, result):
        if case.id == "group_size_48_convert":
            assert not (ws / "models").exists()
            return
        record = json.loads((ws / "models" / "q128" / "cultvlm_convert.json").read_text(encoding="utf-8"))
        assert record["group_size"] == 128
        reasons = {entry["module"]: entry["reason"] for entry in record["left_unquantized"]}
        assert reasons["language_model.model.layers.0.self_attn.q_proj"] == \
            "input size 64 is not a multiple of group size 128"
    return Run(after=after)


@setup("truncated_shard_convert")
def truncated_shard(ws, request, case):
    shutil.copytree(request.getfixturevalue("tiny_hf"), ws / "hf" / "tiny")
    shard = ws / "hf" / "tiny" / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])

    def after(ws, result):
        assert not (ws / "models").exists()
    return Run(after=after)


@setup("disk_full_convert")
def disk_full_during_convert(ws, request, case):
    link_hf(ws, request)
    shutil.copytree(request.getfixturevalue("tiny_4bit"), ws / "models" / "tiny-4bit")
    short_writes(request.getfixturevalue("monkeypatch"))

    def after(ws, result):
        assert sorted(os.listdir(ws / "models")) == ["tiny-4bit"]  # no partial folder left
    return Run(after=after)


@setup("disk_full_checkpoint_lora")
def disk_full_during_checkpoint(ws, request, case):
    small_training_setup(ws, request, steps=2)
    checkpoint = ws / "adapters" / "run" / "checkpoint"
    monkeypatch = request.getfixturevalue("monkeypatch")
    real = mx.save_safetensors
    calls, at_failure = [], {}

    def save_safetensors(file, arrays, *args, **kwargs):
        calls.append(file)
        if len(calls) == 3:  # step 2's checkpoint: steps 1's is in place
            at_failure.update(snapshot(checkpoint))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(file, arrays, *args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", save_safetensors)

    def after(ws, result):
        assert len(calls) == 3 and at_failure
        assert snapshot(checkpoint) == at_failure  # the step-1 checkpoint, byte for byte
        assert json.loads((checkpoint / "state.json").read_text())["step"] == 1
        assert sorted(os.listdir(checkpoint.parent)) == ["checkpoint", "config.yaml", "train_log.jsonl"]
        # Space freed: the run resumes from the kept checkpoint and finishes.
        monkeypatch.setattr(mx, "save_safetensors", real)
        resumed = CliRunner().invoke(main, ["lora", "--config", "run.yaml", "--resume"])
        assert resumed.exit_code == 0, resumed.output
        assert "resumed at step 1" in resumed.output
        assert (checkpoint.parent / "adapters.safetensors").is_file()
        log = [json.loads(line) for line in (checkpoint.parent / "train_log.jsonl").read_text().splitlines()]
        assert [entry["step"] for entry in log] == [1, 2]
    return Run(after=after)


@setup("disk_full_fuse")
def disk_full_during_fuse(ws, request, case):
    small_training_setup(ws, request, steps=1)
    trained = CliRunner().invoke(main, ["lora", "--config", "run.yaml"])
    assert trained.exit_code == 0, trained.output
    fused = CliRunner().invoke(main, [a for a in case.args if a != "--force"])
    assert fused.exit_code == 0, fused.output
    short_writes(request.getfixturevalue("monkeypatch"))

    def after(ws, result):
        assert sorted(os.listdir(ws / "fused")) == ["tiny"]  # no partial folder left
    return Run(after=after)


# ---------------------------------------------------------------- setups: settings and prompts

def nothing_written(*folders):
    def after(ws, result):
        for folder in folders:
            assert not (ws / folder).exists(), f"{folder} was written"
    return Run(after=after)


def with_yaml_line(ws: Path, line: str) -> None:
    """run.yaml with `line` in place of the line that sets the same key (or added)."""
    key = line.split(":")[0]
    kept = [old for old in (ws / "run.yaml").read_text().splitlines() if old.split(":")[0] != key]
    (ws / "run.yaml").write_text("\n".join(kept + [line]) + "\n", encoding="utf-8")


@setup(*[f"yaml_{key}_{name}_lora" for key, name, *_ in errors_doc.LORA_YAML_CASES])
def bad_yaml_setting(ws, request, case):
    small_training_setup(ws, request, steps=1)
    line = next(line for key, name, line, _ in errors_doc.LORA_YAML_CASES if case.id == f"yaml_{key}_{name}_lora")
    with_yaml_line(ws, line)
    return nothing_written("adapters")


def probe_folder(ws: Path, request) -> None:
    link_model(ws, request)
    write_catalog(ws)
    save(picture(1), ws / "probe" / "gena" / "a.png")


@setup(*[f"cli_{name}" for name, *_ in errors_doc.CLI_CASES])
def bad_flag(ws, request, case):
    if case.args[0] == "generate":
        link_model(ws, request)
        make_image(ws / "photo.jpg")
    elif case.args[0] == "eval":
        probe_folder(ws, request)
    else:
        small_training_setup(ws, request, steps=1)
    return nothing_written("adapters", "runs")


@setup(*[f"usage_{name}" for name, *_ in errors_doc.USAGE_CASES])
def usage_mistake(ws, request, case):
    return nothing_written("adapters", "data/manifest.jsonl")


@setup("yaml_list_lora", "yaml_not_utf8_lora")
def unreadable_yaml(ws, request, case):
    small_training_setup(ws, request, steps=1)
    if case.id == "yaml_list_lora":
        (ws / "run.yaml").write_text("- rank\n- 4\n", encoding="utf-8")
    else:
        (ws / "run.yaml").write_bytes("# café\n".encode("latin-1") + (ws / "run.yaml").read_bytes())
    return nothing_written("adapters")


@setup("nan_loss_lora")
def diverging_run(ws, request, case):
    small_training_setup(ws, request, steps=3)
    with_yaml_line(ws, "learning_rate: 1.0e+30")
    with_yaml_line(ws, "warmup_steps: 0")

    def after(ws, result):
        run = ws / "adapters" / "run"
        assert not (run / "adapters.safetensors").exists()
        assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 1
        assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [1]
    return Run(after=after)


@setup("prompt_image_pad_generate", "prompt_im_end_generate")
def control_tokens_in_prompt(ws, request, case):
    link_model(ws, request)
    make_image(ws / "photo.jpg")


@setup("ids_case_check", "ids_nfd_check")
def colliding_ids(ws, request, case):
    ids = ["gena", "Gena"] if case.id == "ids_case_check" else ["алёша", unicodedata.normalize("NFD", "алёша")]
    write_file(ws / "data" / "entities.json", json.dumps(
        {"entities": [{"id": i, "names": {"ru": [f"Имя {n}"]}} for n, i in enumerate(ids)]}).encode())
    return nothing_written("data/manifest.jsonl")


@setup("train_not_utf8_lora")
def latin1_training_line(ws, request, case):
    small_training_setup(ws, request, steps=1)
    with open(ws / "ds" / "train.jsonl", "ab") as f:
        f.write('{"images": [], "messages": "café"}\n'.encode("latin-1"))

    def after(ws, result):
        assert not (ws / "adapters" / "run" / "adapters.safetensors").exists()
    return Run(after=after)


# ---------------------------------------------------------------- setups: adapters, output folders

def good_adapter(ws: Path, request) -> Path:
    folder = ws / "adapters" / "good"
    shutil.copytree(request.getfixturevalue("trained").out, folder,
                    ignore=shutil.ignore_patterns("checkpoint", "*.png", "train_log.jsonl"))
    return folder / "adapters.safetensors"


def damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif how == "empty":
        path.write_bytes(b"")
    else:
        mx.save_safetensors(str(path), {k: mx.full(v.shape, float("nan"), v.dtype) for k, v in mx.load(str(path)).items()})


@setup(*[f"adapter_{name}_{command[0]}" for name, *_ in errors_doc.DAMAGED_ADAPTERS
         for command in (errors_doc.GENERATE_WITH_ADAPTER, errors_doc.EVAL_WITH_ADAPTER)])
def damaged_adapter(ws, request, case):
    probe_folder(ws, request)
    make_image(ws / "photo.jpg")
    damage(good_adapter(ws, request), case.id.split("_")[1])


@setup(*[f"out_{name}" for name, *_ in errors_doc.OUT_CASES])
def misplaced_out(ws, request, case):
    name = case.id.removeprefix("out_")
    if name.startswith("lora"):
        small_training_setup(ws, request, steps=1)
        if name == "lora_force_user_files":
            write_file(ws / "adapters" / "run" / "notes.txt", b"my notes")
            write_file(ws / "adapters" / "run" / "train_log.jsonl", b'{"step": 1, "loss": 2.0}\n')
    elif name.startswith("fuse"):
        link_model(ws, request)
        good_adapter(ws, request)
        write_file(ws / "mine" / "notes.txt", b"my notes")
    elif name == "convert_is_source":
        shutil.copytree(request.getfixturevalue("tiny_hf"), ws / "hf" / "tiny")
    elif name == "eval_inside_data":
        link_model(ws, request)
        write_catalog(ws)
        save(picture(1), ws / "ds" / "images" / "a.png")
        write_lines(ws / "ds" / "test.jsonl", [dataset_line("images/a.png", "gena")])
    elif name in ("eval_force_user_files", "compare_is_run"):
        probe_folder(ws, request)
        first = CliRunner().invoke(main, errors_doc.EVAL + ["--max-tokens", "4"])
        assert first.exit_code == 0, first.output
        write_file(ws / "runs" / "probe" / "notes.txt", b"my notes")
    else:  # data build
        write_catalog(ws)
        for n in range(3):
            save(picture(n), ws / "data" / "images" / "gena" / f"{n}.png")
        write_file(ws / "mine" / "notes.txt", b"my notes")


def other_process(exited: bool) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    if exited:
        process.kill()
        process.wait()  # reaped: its pid names no process now
    return process


@setup("lock_held_lora", "lock_stale_lora")
def locked_output(ws, request, case):
    small_training_setup(ws, request, steps=1)
    holder = other_process(exited=case.id == "lock_stale_lora")
    write_file(ws / "adapters" / ".run.lock", json.dumps({"pid": holder.pid, "command": "lora"}).encode())

    def after(ws, result):
        holder.kill()
        holder.wait()
        if case.id == "lock_stale_lora":
            assert not (ws / "adapters" / ".run.lock").exists()
            assert (ws / "adapters" / "run" / "adapters.safetensors").is_file()
        else:
            assert not (ws / "adapters" / "run").exists()
    return Run(placeholders={"pid": str(holder.pid)}, after=after)


# ---------------------------------------------------------------- setups: GigaChat, Commons

def tls_server(ws: Path) -> int:
    """A TLS server with a self-signed certificate (as a client without the right CA sees
    GigaChat's): the port. It only shakes hands."""
    import socket
    import ssl
    import threading

    key, cert = ws.parent / f"{ws.name}-key.pem", ws.parent / f"{ws.name}-cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            connection, _ = listener.accept()
            try:
                context.wrap_socket(connection, server_side=True).close()
            except (ssl.SSLError, OSError):
                connection.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


@setup("gigachat_no_credentials", "gigachat_bad_setting", "gigachat_401", "gigachat_429", "gigachat_500",
       "gigachat_timeout", "gigachat_basic_prefix", "gigachat_not_base64", "gigachat_no_ca_bundle",
       "gigachat_untrusted_certificate")
def gigachat_trouble(ws, request, case):
    fake = request.getfixturevalue("gigachat")
    images_for_captions(ws)  # a.jpg captioned already: that line must survive
    env = fake.env()
    if case.id == "gigachat_no_credentials":
        del env["GIGACHAT_CREDENTIALS"]
    elif case.id == "gigachat_bad_setting":
        env["GIGACHAT_VERIFY_SSL_CERTS"] = "maybe"
    elif case.id == "gigachat_401":
        env = fake.env(credential=base64.b64encode(b"someone:else").decode())
    elif case.id == "gigachat_basic_prefix":
        env["GIGACHAT_CREDENTIALS"] = "Basic " + CREDENTIAL
    elif case.id == "gigachat_not_base64":
        env["GIGACHAT_CREDENTIALS"] = CREDENTIAL[:10] + " " + CREDENTIAL[10:]
    elif case.id == "gigachat_no_ca_bundle":
        env["GIGACHAT_CA_BUNDLE_FILE"] = "russian_trusted_root_ca.crt"
    elif case.id == "gigachat_untrusted_certificate":
        env["GIGACHAT_AUTH_URL"] = f"https://127.0.0.1:{tls_server(ws)}/api/v2/oauth"
        del env["GIGACHAT_VERIFY_SSL_CERTS"]  # verify, as by default
    fake.chat_script = {"gigachat_429": ["429", "429"], "gigachat_500": ["500", "500"],
                        "gigachat_timeout": ["slow"]}.get(case.id, [])

    def after(ws, result):
        requests = [r["path"] for r in fake.requests]
        if case.id in ("gigachat_no_credentials", "gigachat_bad_setting", "gigachat_basic_prefix",
                       "gigachat_not_base64", "gigachat_no_ca_bundle", "gigachat_untrusted_certificate"):
            assert requests == []
        elif case.id == "gigachat_401":
            assert requests == ["/api/v2/oauth"]  # no retries, no upload
        else:
            chats = requests.count("/api/v1/chat/completions")
            assert chats == (1 if case.id == "gigachat_timeout" else 2)
        for secret in (CREDENTIAL, TOKEN):
            assert secret not in result.output
    return Run(env=env, after=after)


@setup("commons_html", "commons_403")
def commons_html(ws, request, case):
    fake = request.getfixturevalue("commons")
    fake.api_always = case.id.removeprefix("commons_")
    write_catalog(ws)
    save(picture(1), ws / "data" / "images" / "gena" / "commons_1.jpg")
    write_lines(ws / "data" / "images" / "gena" / "sources.jsonl",
                [{"file": "commons_1.jpg", "source": "commons", "pageid": 1, "license": "CC0"}])

    def after(ws, result):
        assert sorted(os.listdir(ws / "data" / "images" / "gena")) == ["commons_1.jpg", "sources.jsonl"]
    return Run(placeholders={"endpoint": f"{fake.url}/w/api.php"}, env={"CULTVLM_CONTACT": None}, after=after)


# ---------------------------------------------------------------- beyond the table

def test_a_real_process_prints_one_line_for_a_non_utf8_path(workspace):
    """Outside CliRunner: a truncated file whose name is not UTF-8, passed as raw bytes on the
    command line; stderr holds one line, the name shown with \\x escapes; no traceback."""
    name = os.fsencode(NON_UTF8)
    (workspace / NON_UTF8).write_bytes(truncated_jpeg())
    package_root = str(Path(mlx_cultvlm.__file__).resolve().parent.parent)  # the code under test
    result = subprocess.run([sys.executable, "-m", "mlx_cultvlm.cli", "generate", name, "--model", "tiny-4bit"],
                            capture_output=True, timeout=120, env={**os.environ, "PYTHONPATH": package_root})
    assert result.returncode == 1
    (line,) = result.stderr.decode("utf-8").splitlines()
    assert line.startswith("Error: caf\\xe9.jpg: cannot decode image (image file is truncated")
    assert result.stdout == b""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_mlx_reports_a_full_disk_only_through_a_python_file():
    """Why cultvlm writes safetensors through Python file objects and checks what mlx-vlm wrote:
    given a path, MLX ignores the write error of a full disk."""
    arrays = {"w": mx.zeros((256, 256))}
    mx.save_safetensors("/dev/full", arrays)  # no error, nothing written
    with pytest.raises(OSError) as raised:
        with open("/dev/full", "wb") as f:
            mx.save_safetensors(f, arrays)
    assert raised.value.errno == errno.ENOSPC
