"""Image token counts: our pixel-budget sizing, the processor's grid and the prompt agree."""

import mlx_vlm
import numpy as np
import pytest

from conftest import make_image
from mlx_cultvlm.generate import build_prompt
from mlx_cultvlm.images import fit_to_budget, grid_size, load_image, num_image_tokens


def test_448_square_is_256_tokens():
    assert grid_size(448, 448, max_pixels=448 * 448) == (448, 448)
    assert num_image_tokens(448, 448) == 256


@pytest.mark.parametrize("width,height,max_pixels", [
    (448, 448, 448 * 448), (640, 480, 448 * 448), (480, 640, 448 * 448), (1000, 200, 448 * 448),
    (30, 30, 448 * 448), (333, 777, 224 * 224), (1920, 1080, 1024 * 768), (57, 900, 200_000),
])
def test_prompt_has_as_many_image_tokens_as_the_grid_implies(tiny_4bit, tmp_path, width, height, max_pixels):
    _, processor = mlx_vlm.load(str(tiny_4bit))
    image = fit_to_budget(load_image(make_image(tmp_path / "x.png", width, height)), max_pixels=max_pixels)
    assert image.width % 28 == 0 and image.height % 28 == 0
    assert image.width * image.height <= max_pixels
    assert abs(np.log((image.width / image.height) / (width / height))) < 0.35  # aspect kept
    inputs = processor(images=[image], text=[build_prompt(processor, "Кто это?")])
    t, h, w = np.array(inputs["image_grid_thw"])[0].tolist()
    expected = num_image_tokens(image.height, image.width)
    assert t * h * w // 4 == expected
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((np.array(inputs["input_ids"]) == image_pad).sum()) == expected
    assert np.array(inputs["pixel_values"]).shape == (t * h * w, 3 * 2 * 14 * 14)
