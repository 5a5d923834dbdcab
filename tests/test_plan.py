"""`cultvlm plan`: the memory predictor held to measured peaks, and the command's answers.

Measured peaks are MLX's active memory (`mx.get_peak_memory()` after `mx.reset_peak_memory()`,
less what was allocated before the model was built): what the step actually allocates. The
allocator's cache of freed buffers (`mx.get_cache_memory()`) is not part of it, and the
prediction does not claim it either; on the tiny model the fixed pieces that do count (the
pixel input, rope tables, masks) are modelled, not absorbed into a tolerance.
"""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten, tree_map

from mlx_cultvlm import lora, vlm
from mlx_cultvlm.errors import CultvlmError
from mlx_cultvlm.models import build_random_model, real_config
from mlx_cultvlm.images import DEFAULT_MAX_PIXELS
from mlx_cultvlm.plan import (GB, PLAN_MODELS, USABLE, Arch, Step, fits, plan_command, predict_inference,
                              predict_training, recommend, recommendation_line, TEXT_LINEARS)
from mlx_cultvlm.samples import Batch
from mlx_cultvlm.tiny import QWEN_OTHER_ADDED_TOKENS, QWEN_SPECIAL_TOKENS, TinySpec, _model_config, build_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 0.15  # the planner's promise: predicted peak within 15% of the measured one

# The mid-size model of scripts/bench_eval.py.
MID = TinySpec(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=704, mrope_section=[8, 12, 12], vision_depth=4, vision_hidden_size=128,
               vision_heads=4, vision_intermediate_size=256, fullatt_block_indexes=[3])
SPECS = {"tiny": TinySpec(), "mid": MID}


def spec_config(spec: TinySpec) -> dict:
    """config.json exactly as build_tiny_qwen writes it for this spec (vocab and token ids
    from the tokenizer it builds), without writing the checkpoint."""
    tokenizer = build_tokenizer(spec)
    ids = {t: tokenizer.token_to_id(t) for t in QWEN_SPECIAL_TOKENS + QWEN_OTHER_ADDED_TOKENS}
    return _model_config(spec, ids, 64 * math.ceil(tokenizer.get_vocab_size() / 64))


@pytest.fixture(scope="module")
def configs():
    return {name: spec_config(spec) for name, spec in SPECS.items()}


def sample_batch(config: dict, side: int, text: int, target: int, batch: int) -> Batch:
    """`batch` samples of one side x side image and `text` text tokens, the last `target` of them
    assistant tokens (as scripts/bench_memory.py builds its step)."""
    rng = np.random.default_rng(0)
    grid = side // 14
    rows = [np.concatenate([rng.integers(0, 700, 16), [config["vision_start_token_id"]],
                            np.full(grid * grid // 4, config["image_token_id"]), [config["vision_end_token_id"]],
                            rng.integers(0, 700, text - 16)]) for _ in range(batch)]
    ids = np.stack(rows).astype(np.int32)
    loss_mask = np.zeros_like(ids, dtype=bool)
    loss_mask[:, -target:] = True
    pixels = rng.standard_normal((batch * grid * grid, 3 * 2 * 14 * 14)).astype(np.float32)
    return Batch(ids, np.ones_like(ids), loss_mask, pixels, np.array([[1, grid, grid]] * batch))


def random_model(config: dict, bits: int | None, group_size: int):
    """As bench_memory.py: random weights, the language model quantized, floats in float32."""
    model = build_random_model(config)
    if bits:
        nn.quantize(model.language_model, group_size=group_size, bits=bits)
    model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    mx.eval(model.parameters())
    return model


def measure_training_step(config: dict, side=224, text=64, target=32, batch=1, rank=16, targets=TEXT_LINEARS,
                          grad_checkpoint=False, bits=4, group_size=32) -> tuple[int, int, Step]:
    """(measured peak bytes, weight bytes, the matching Step): two optimizer steps of the
    training loop's body (lora._train_loop: step_inputs, the grad function, clip, AdamW), the
    peak taken over the second, when AdamW's moments exist as they do in a run."""
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    model = random_model(config, bits, group_size)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    cfg = lora.LoraConfig(data="-", rank=rank, alpha=2 * rank, dropout=0.0, targets=list(targets))
    mx.random.seed(0)
    vlm.attach_lora(model, lora.resolve_targets(model, cfg), cfg.rank, cfg.alpha / cfg.rank, cfg.dropout)
    layer_class = type(model.language_model.model.layers[0])
    plain_call = layer_class.__call__
    if grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint as checkpoint_layers

        checkpoint_layers(model.language_model.model.layers[0])
    try:
        model.train()
        optimizer = optim.AdamW(learning_rate=1e-4)
        optimizer.init(model.trainable_parameters())
        mx.eval(model.trainable_parameters(), optimizer.state)
        grad_fn = lora.make_grad_fn(model, vision_trainable=False, use_compile=False)
        data = sample_batch(config, side, text, target, batch)
        for _ in range(2):
            mx.reset_peak_memory()
            inputs = lora.step_inputs(model, data, config["image_token_id"])
            (loss, _), grads = grad_fn(inputs)
            mx.eval(grads, loss)
            n_targets = inputs.n_targets
            grads = tree_map(lambda g: g / n_targets, grads)
            grads, grad_norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
            optimizer.update(model, grads)
            mx.eval(model.trainable_parameters(), optimizer.state, grad_norm)
            del inputs, loss, grads, grad_norm
        peak = mx.get_peak_memory() - base
    finally:
        layer_class.__call__ = plain_call
    step = Step(bits=bits, group_size=group_size, float_bytes=4, rank=rank, targets=tuple(targets), batch=batch,
                image_tokens=(side // 28) ** 2, target_tokens=target, seq_len=int(data.input_ids.shape[1]),
                grad_checkpoint=grad_checkpoint)
    return peak, weights, step


def test_parameter_counts_are_the_models():
    for size, total in (("3b", 3_754_622_976), ("7b", 8_292_166_656)):
        assert Arch.from_config(real_config(size)).params() == total
    for spec in SPECS.values():
        config = spec_config(spec)
        model = build_random_model(config)  # lazy: nothing is allocated
        assert Arch.from_config(config).params() == sum(p.size for _, p in tree_flatten(model.parameters()))
    assert TEXT_LINEARS == tuple(vlm.TEXT_LINEARS)


def test_every_bench_memory_measurement_is_predicted_within_15_percent():
    """The real 3B/7B widths at the depths scripts/bench_memory.py measured (4-bit g64 text
    weights with float32 scales, float32 vision and activations; one 448² image + 64 text
    tokens, 32 with loss; one step with a fresh AdamW)."""
    report = json.loads((ROOT / "docs" / "bench_memory.json").read_text(encoding="utf-8"))
    rows = [r for r in report["results"] if r["kind"] == "measured"]
    assert len(rows) == 16
    errors = []
    for r in rows:
        config = real_config(r["size"])
        config["num_hidden_layers"] = r["text_layers"]
        config["vision_config"]["depth"] = r["vision_blocks"]
        config["vision_config"]["fullatt_block_indexes"] = [r["vision_blocks"] - 1]
        step = Step(bits=4, group_size=64, float_bytes=4, image_tokens=256, text_tokens=64, target_tokens=32,
                    seq_len=r["sequence"], grad_checkpoint=r["grad_checkpoint"], fresh_optimizer=True)
        predicted = predict_training(Arch.from_config(config), step)
        assert predicted.weights == pytest.approx(r["weights_gib"] * GB, rel=1e-9)
        errors.append(predicted.total / (r["peak_gib"] * GB) - 1)
    assert max(abs(e) for e in errors) <= TOLERANCE, [f"{e:+.1%}" for e in errors]


CASES = {  # name: (model, measure_training_step options)
    "tiny-224": ("tiny", {}),
    "tiny-224-ckpt": ("tiny", {"grad_checkpoint": True}),
    "tiny-112-batch4-lm_head": ("tiny", {"side": 112, "batch": 4, "rank": 8, "targets": TEXT_LINEARS + ("lm_head",)}),
    "mid-224": ("mid", {}),
    "mid-224-ckpt": ("mid", {"grad_checkpoint": True}),
    "mid-112-batch2-8bit": ("mid", {"side": 112, "batch": 2, "bits": 8}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_real_lora_step_is_predicted_within_15_percent(configs, case):
    name, options = CASES[case]
    measured, weights, step = measure_training_step(configs[name], **options)
    predicted = predict_training(Arch.from_config(configs[name]), step)
    assert predicted.weights == weights  # exact: the same tensors, counted from the config
    assert abs(predicted.total / measured - 1) <= TOLERANCE, (predicted.total, measured)


def test_generation_is_predicted_within_15_percent(configs):
    """Answering about one image with mlx-vlm's generation loop (prefill + 16 tokens), on the
    mid-size model: a 224² image, and a long prompt where the language model dominates."""
    from mlx_vlm.generate.ar import generate_step

    config = configs["mid"]
    arch = Arch.from_config(config)
    for side, text in ((224, 48), (112, 1000)):
        gc.collect()
        mx.clear_cache()
        model = random_model(config, 4, 32)
        model.eval()
        data = sample_batch(config, side, text, 1, 1)
        ids, mask, grid = mx.array(data.input_ids), mx.array(data.attention_mask), mx.array(data.image_grid_thw)
        mx.eval(ids, mask, grid)
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        pixels = mx.array(data.pixel_values)  # what the processor hands over counts
        for n, _ in enumerate(generate_step(ids, model, pixels, mask, max_tokens=16, image_grid_thw=grid,
                                            temperature=0.0)):
            if n + 1 == 16:
                break
        measured = mx.get_peak_memory() - base + sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        step = Step(bits=4, group_size=32, float_bytes=4, image_tokens=(side // 28) ** 2,
                    seq_len=int(ids.shape[1]), answer_tokens=16)
        predicted = predict_inference(arch, step).total
        assert abs(predicted / measured - 1) <= TOLERANCE, (side, text, predicted, measured)
        del model, pixels


def run(*args):
    return CliRunner().invoke(plan_command, list(args))


def test_the_table_covers_every_preset_or_the_one_asked_for():
    result = run("--memory", "24")
    assert result.exit_code == 0, result.output
    for name in PLAN_MODELS:
        assert any(line.split()[:1] == [name] for line in result.output.splitlines())
    assert "16.0 GB" in result.output  # 2/3 of 24 GB: the usable figure is stated
    assert result.output.strip().splitlines()[-1].startswith("recommendation: cultvlm lora --model ")
    one = run("--memory", "24", "--model", "7b-4bit", "--rank", "8", "--max-pixels", str(336 * 336),
              "--batch", "2", "--grad-checkpoint")
    assert one.exit_code == 0, one.output
    rows = [line for line in one.output.splitlines() if line.split()[:1] in ([n] for n in PLAN_MODELS)]
    assert len(rows) == 1 and rows[0].startswith("7b-4bit")
    assert "--grad-checkpoint" in one.output.splitlines()[-1]


@pytest.mark.parametrize("args, message", [
    (["--memory", "24", "--model", "13b-4bit"], "unknown model '13b-4bit'"),
    (["--memory", "24", "--model", "tiny"], "model 'tiny'"),
    (["--memory", "0"], "memory must be greater than 0, got 0.0"),
    (["--memory", "-8"], "memory must be greater than 0, got -8.0"),
    (["--memory", "nan"], "memory must be a finite number, got nan"),
    (["--memory", "24", "--rank", "0"], "rank must be greater than 0, got 0"),
    (["--memory", "24", "--batch", "-1"], "batch must be greater than 0, got -1"),
    (["--memory", "24", "--images", "-1"], "images must be greater than or equal to 0, got -1"),
    (["--memory", "24", "--max-pixels", "100"], "max_pixels must be greater than or equal to 784, got 100"),
    (["--memory", "24", "--max-pixels", "99999999"], "max_pixels must be less than or equal to 12845056"),
    (["--memory", "24", "--usable", "1.5"], "usable must be less than or equal to 1, got 1.5"),
])
def test_bad_input_is_one_clear_line(args, message):
    result = run(*args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output


def test_bad_configs_and_steps_raise_the_project_error():
    with pytest.raises(CultvlmError, match="model config"):
        Arch.from_config({"hidden_size": 64})
    arch = Arch.from_config(real_config("3b"))
    with pytest.raises(CultvlmError, match="rank must be positive"):
        predict_training(arch, Step(rank=0))
    with pytest.raises(CultvlmError, match="ties lm_head"):
        predict_training(arch, Step(targets=TEXT_LINEARS + ("lm_head",)))


def test_less_memory_never_recommends_more():
    """Memory from 256 GB down to 2 GB in half-GB steps: the model never grows; for the same
    model the pixel budget never grows; for the same model and pixels the batch never grows."""
    order = {name: i for i, name in enumerate(PLAN_MODELS)}
    previous, seen = None, set()
    for memory in np.arange(256, 1.9, -0.5):
        choice = recommend(float(memory), max_pixels=448 * 448 * 4, batch=8)
        if choice is None:
            seen.add(None)
            previous = (len(PLAN_MODELS), 0, 0)
            continue
        assert fits(choice.peak, memory * GB * USABLE)
        seen.add(choice.model)
        key = (order[choice.model], -choice.max_pixels, -choice.batch)
        if previous is not None:
            assert key[0] >= previous[0]
            if key[0] == previous[0]:
                assert key[1:] >= previous[1:], (memory, choice)
        previous = key
    assert {"7b", "7b-4bit", "3b-4bit", None} <= seen  # the sweep did move through the range
    big, small = recommend(64.0), recommend(8.0)
    assert order[big.model] < order[small.model]


def test_the_feature_cache_goes_before_the_model_does():
    """5,000 training images' vision features are 8.5 GB on 7B: the recommendation drops the
    cache (a slower epoch) rather than the model (what it knows)."""
    few, many = recommend(24.0, images=0), recommend(24.0, images=5000)
    assert few.model == many.model == "7b-8bit"
    assert few.feature_cache and not many.feature_cache
    assert "--no-feature-cache" in recommendation_line(many, PLAN_MODELS, 24.0, USABLE, DEFAULT_MAX_PIXELS, 1)
    assert "--no-feature-cache" not in recommendation_line(few, PLAN_MODELS, 24.0, USABLE, DEFAULT_MAX_PIXELS, 1)
    assert recommend(24.0, models=("7b-4bit",), images=5000).feature_cache is False
    assert recommend(24.0, models=("7b-4bit",), images=1000).feature_cache is True
