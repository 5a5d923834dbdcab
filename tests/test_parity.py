"""The MLX model computes what the transformers (torch, fp32) reference computes."""

import mlx.core as mx
import mlx_vlm
import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from conftest import make_image
from mlx_cultvlm.generate import build_prompt
from mlx_cultvlm.images import fit_to_budget, load_image

# Measured: max |diff| ~4e-7 on logits of magnitude ~0.7 (fp32 on both sides).
ATOL = 1e-5


@pytest.fixture(scope="module")
def reference(tiny_hf):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_hf), dtype=torch.float32)
    return model.eval()


# 224x308 gives a 8x11 merged grid: several attention windows, the last ones padded.
@pytest.mark.parametrize("size", [(224, 224), (224, 308), (420, 140)])
def test_logits_match_transformers(tiny_fp32, reference, tmp_path, size):
    model, processor = mlx_vlm.load(str(tiny_fp32))  # the converted folder, stock loader
    assert model.language_model.model.embed_tokens.weight.dtype == mx.float32
    height, width = size
    image = fit_to_budget(load_image(make_image(tmp_path / "a.png", width, height)), max_pixels=width * height)
    inputs = processor(images=[image], text=[build_prompt(processor, "Кто это? Who is it?")])
    ids = np.array(inputs["input_ids"])
    pixels = np.array(inputs["pixel_values"], dtype=np.float32)
    grid = np.array(inputs["image_grid_thw"])
    assert grid.tolist() == [[1, height // 14, width // 14]]

    out = model(mx.array(ids), mx.array(pixels), mask=mx.ones(ids.shape), image_grid_thw=mx.array(grid))
    ours = np.array(out.logits)

    tids = torch.tensor(ids)
    with torch.no_grad():
        ref = reference(input_ids=tids, attention_mask=torch.ones_like(tids),
                        pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grid),
                        # transformers needs these for correct multimodal rope positions
                        mm_token_type_ids=(tids == reference.config.image_token_id).long()).logits.numpy()
    assert ours.shape == ref.shape
    diff = np.abs(ours - ref).max()
    assert diff < ATOL, f"max |logit diff| {diff:.2e}"
    # Not vacuous: the image changes the logits far more than the tolerance.
    blank = np.zeros_like(pixels)
    other = np.array(model(mx.array(ids), mx.array(blank), mask=mx.ones(ids.shape),
                           image_grid_thw=mx.array(grid)).logits)
    assert np.abs(other - ours).max() > 100 * ATOL
