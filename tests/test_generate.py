"""`cultvlm generate`: streaming answers from the converted tiny model, and bad images."""

import os
import subprocess
import sys
from pathlib import Path

import mlx_vlm
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import make_image
from mlx_cultvlm.cli import main
from mlx_cultvlm.generate import build_prompt, stream_answer
from mlx_cultvlm.vlm import load_model
from mlx_cultvlm.images import fit_to_budget, load_image


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_console_script_streams_an_answer(tiny_4bit, image_file):
    cli = Path(sys.executable).with_name("cultvlm")
    result = subprocess.run(
        [str(cli), "generate", str(image_file), "--model", str(tiny_4bit), "--max-tokens", "12"],
        capture_output=True, text=True, timeout=300, env=os.environ)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_stream_pieces_add_up_to_the_greedy_answer(tiny_4bit, image_file):
    model, processor = load_model(str(tiny_4bit))
    pieces = list(stream_answer(model, processor, image_file, "Кто это?", max_tokens=12))
    assert len(pieces) > 1  # streamed, not returned at once
    image = fit_to_budget(load_image(image_file))
    whole = mlx_vlm.generate(model, processor, build_prompt(processor, "Кто это?"), image=[image],
                             max_tokens=12, temperature=0.0)
    assert "".join(pieces) == whole.text


def test_the_image_matters(tiny_4bit, tmp_path):
    model, processor = load_model(str(tiny_4bit))
    answers = {"".join(stream_answer(model, processor, make_image(tmp_path / f"{s}.png", seed=s),
                                     "Кто это?", max_tokens=16)) for s in range(4)}
    assert len(answers) > 1


def test_several_images_give_several_answers(tiny_4bit, tmp_path):
    a, b = make_image(tmp_path / "a.jpg", seed=1), make_image(tmp_path / "b.png", 200, 500, seed=2)
    result = run("generate", str(a), str(b), "--model", str(tiny_4bit), "--max-tokens", "5")
    assert result.exit_code == 0, result.output
    assert f"== {a}" in result.output and f"== {b}" in result.output


def test_preset_resolves_in_models_dir_and_missing_preset_says_convert(tiny_4bit, tmp_path, image_file):
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny-4bit").symlink_to(tiny_4bit)
    ok = run("generate", str(image_file), "--model", "tiny-4bit", "--models-dir", str(models),
             "--max-tokens", "3")
    assert ok.exit_code == 0, ok.output
    missing = run("generate", str(image_file), "--model", "7b-4bit", "--models-dir", str(models))
    assert missing.exit_code == 1 and "cultvlm convert --model 7b-4bit" in missing.output


def _truncated_jpeg(path):
    make_image(path.with_suffix(".full.jpg"))
    path.write_bytes(path.with_suffix(".full.jpg").read_bytes()[:2000])


@pytest.mark.parametrize("name,write,expected", [
    ("empty.jpg", lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    ("text.jpg", lambda p: p.write_text("hello, I am not a picture"), "not an image Pillow can read"),
    ("cut.jpg", _truncated_jpeg, "cannot decode image"),
    ("missing.jpg", lambda p: None, "no such image file"),
])
def test_bad_image_gets_one_line_naming_it(tiny_4bit, tmp_path, name, write, expected):
    path = tmp_path / name
    write(path)
    result = run("generate", str(path), "--model", str(tiny_4bit))
    assert result.exit_code == 1
    assert str(path) in result.output and expected in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_model_folder_and_adapter(tiny_4bit, tmp_path, image_file):
    result = run("generate", str(image_file), "--model", str(tmp_path))
    assert result.exit_code == 1 and "config.json: missing" in result.output
    result = run("generate", str(image_file), "--model", str(tiny_4bit), "--adapter", str(tmp_path))
    assert result.exit_code == 1 and "missing (not an adapter folder)" in result.output
    result = run("generate", str(image_file), "--model", str(tiny_4bit), "--max-pixels", "100")
    assert result.exit_code == 1 and "pixel budget" in result.output


def test_exif_rotation_and_transparency_are_applied(tmp_path):
    src = make_image(tmp_path / "src.png", 320, 240)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.open(src).save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (240, 320)

    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red
    rgba.save(tmp_path / "clear.png")
    img = load_image(tmp_path / "clear.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)
    Image.new("P", (40, 40), 3).save(tmp_path / "palette.gif")
    assert load_image(tmp_path / "palette.gif").mode == "RGB"
