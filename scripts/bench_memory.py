"""Memory (and time) of one QLoRA step on the real Qwen2.5-VL 3B / 7B architectures.

    python scripts/bench_memory.py --out bench_memory.json            # the default plan
    python scripts/bench_memory.py --one 7b 2 2 0                      # one measurement

Each measurement runs in its own process (clean peak counter; gradient checkpointing patches
the decoder-layer class). It builds the real widths with random weights, lazily, quantizes the
language model to 4 bits (group 64) as `cultvlm convert` does and evaluates layer by layer, so
the full-precision model never exists; attaches LoRA rank 16 to every decoder linear; and runs
one training step on one 448x448 image (256 image tokens) + 64 text tokens (32 of them
assistant tokens carrying loss).

The CPU backend makes full-depth steps impractical here (4-bit matmul runs at ~2.6 GFLOP/s), so
the default plan measures reduced depths -- text decoder layers d and vision blocks v at the
real widths -- fits peak = a + b*d + c*v per model and checkpointing setting, checks the fit
against a depth it did not use, and extrapolates to full depth. Every figure in the JSON says
whether it was measured or extrapolated.

On this CPU the benchmark keeps quantization scales and the vision tower in float32 (bf16
activations would make every matmul 6x slower here); on a Mac they are bf16, which is smaller.
The analytic estimate gives both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3
SEQ_TEXT, SEQ_TARGET, IMAGE_SIDE = 64, 32, 448
FULL_DEPTH = {"3b": (36, 32), "7b": (28, 32)}  # (text layers, vision blocks)


def measure(size: str, text_layers: int, vision_blocks: int, checkpoint: bool) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten, tree_map

    from mlx_cultvlm.lora import LoraConfig, make_grad_fn, resolve_targets, step_inputs
    from mlx_cultvlm.vlm import attach_lora
    from mlx_cultvlm.models import build_random_model, real_config
    from mlx_cultvlm.samples import Batch

    config = real_config(size)
    config["num_hidden_layers"] = text_layers
    config["vision_config"]["depth"] = vision_blocks
    config["vision_config"]["fullatt_block_indexes"] = [vision_blocks - 1]  # keep one full-attention block
    model = build_random_model(config)
    # Random init, as the real weights would be loaded: quantize the text linears and the
    # embedding lazily, then evaluate one layer at a time.
    nn.quantize(model.language_model, group_size=64, bits=4)
    model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    for layer in list(model.language_model.model.layers) + list(model.vision_tower.blocks):
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    weights_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    mx.clear_cache()

    cfg = LoraConfig(data="-", rank=16, alpha=32, dropout=0.0)
    mx.random.seed(0)
    attach_lora(model, resolve_targets(model, cfg), cfg.rank, cfg.alpha / cfg.rank, cfg.dropout)
    mx.eval(model.trainable_parameters())
    if checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.language_model.model.layers[0])
    model.train()
    resident = mx.get_active_memory()

    # One image + 64 text tokens; the last 32 tokens are the assistant answer.
    grid = IMAGE_SIDE // 14
    n_image = grid * grid // 4
    rng = np.random.default_rng(0)
    text = rng.integers(0, 150000, SEQ_TEXT)
    ids = np.concatenate([text[:16], [config["vision_start_token_id"]], np.full(n_image, config["image_token_id"]),
                          [config["vision_end_token_id"]], text[16:]]).astype(np.int32)[None]
    loss_mask = np.zeros_like(ids, dtype=bool)
    loss_mask[0, -SEQ_TARGET:] = True
    pixels = rng.standard_normal((grid * grid, 3 * 2 * 14 * 14)).astype(np.float32)
    batch = Batch(ids, np.ones_like(ids), loss_mask, pixels, np.array([[1, grid, grid]]))

    optimizer = optim.AdamW(learning_rate=1e-4)
    grad_fn = make_grad_fn(model, vision_trainable=False, use_compile=False)
    mx.reset_peak_memory()
    start = time.perf_counter()
    inputs = step_inputs(model, batch, config["image_token_id"])
    (loss, _), grads = grad_fn(inputs)
    optimizer.update(model, grads)
    mx.eval(loss, model.trainable_parameters(), optimizer.state)
    seconds = time.perf_counter() - start
    return {"size": size, "text_layers": text_layers, "vision_blocks": vision_blocks,
            "grad_checkpoint": checkpoint, "sequence": int(ids.shape[1]),
            "weights_gib": weights_bytes / GIB, "resident_gib": resident / GIB,
            "peak_gib": mx.get_peak_memory() / GIB, "seconds_per_step": seconds,
            "loss": loss.item(), "kind": "measured"}


def analytic(size: str, checkpoint: bool, scale_bytes: int) -> dict:
    """Weights from the exact parameter counts; activations from what the backward keeps."""
    from mlx.utils import tree_flatten

    from mlx_cultvlm.models import build_random_model, real_config

    config = real_config(size)
    params = dict(tree_flatten(build_random_model(config).parameters()))
    vision = sum(v.size for k, v in params.items() if k.startswith("vision_tower."))
    matrices = sum(v.size for k, v in params.items() if not k.startswith("vision_tower.") and v.ndim == 2)
    other = sum(v.size for k, v in params.items() if not k.startswith("vision_tower.") and v.ndim != 2)
    weights = matrices * 0.5 + matrices / 64 * 2 * scale_bytes + (other + vision) * scale_bytes
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    seq = SEQ_TEXT + (IMAGE_SIDE // 28) ** 2
    # A (in x r) and B (r x out) of q, k, v, o, gate, up, down at rank 16
    lora = layers * 16 * (9 * h + 2 * kv + 3 * inter)
    lora_bytes = lora * 4 * 4  # weights, gradient, two Adam moments, float32
    # Per layer the backward keeps the inputs of the 7 linears, norms, q/k/v after rope, the
    # attention output and the MLP's gate/up/activation: ~ (10 h + 4 inter) floats per token,
    # plus the attention probabilities (heads x seq^2).
    per_layer = seq * (10 * h + 4 * inter) * 4 + config["num_attention_heads"] * seq * seq * 4
    activations = per_layer * (1 if checkpoint else layers) + seq * h * 4 * layers * checkpoint
    return {"weights_gib": weights / GIB, "lora_and_optimizer_gib": lora_bytes / GIB,
            "activations_gib": activations / GIB, "peak_gib": (weights + lora_bytes + activations) / GIB}


def run_one(size, d, v, ckpt) -> dict:
    result = subprocess.run([sys.executable, __file__, "--one", size, str(d), str(v), str(int(ckpt))],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def fit(points: list[dict], key: str):
    """Least squares key = a + b*text_layers + c*vision_blocks."""
    import numpy as np

    X = np.array([[1, p["text_layers"], p["vision_blocks"]] for p in points], dtype=float)
    y = np.array([p[key] for p in points])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    return lambda d, v: float(coef @ [1, d, v])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=4, metavar=("SIZE", "TEXT_LAYERS", "VISION_BLOCKS", "CKPT"))
    parser.add_argument("--sizes", nargs="+", default=["3b", "7b"])
    parser.add_argument("--fit-depths", nargs="+", type=int, default=[1, 2],
                        help="text depths measured for the fit (with 1 and 2 vision blocks)")
    parser.add_argument("--check-depth", type=int, default=3, help="a text depth measured to check the fit")
    parser.add_argument("--out", default="bench_memory.json")
    args = parser.parse_args()
    if args.one:
        size, d, v, ckpt = args.one
        print(json.dumps(measure(size, int(d), int(v), bool(int(ckpt)))))
        return

    report = {"machine": _machine(), "step": f"LoRA r16 on 7 decoder linears; one {IMAGE_SIDE}x{IMAGE_SIDE} image "
              f"({(IMAGE_SIDE // 28) ** 2} tokens) + {SEQ_TEXT} text tokens, {SEQ_TARGET} with loss; batch 1",
              "dtypes": "measured: 4-bit g64 text weights with float32 scales, float32 vision and activations",
              "results": []}
    for size in args.sizes:
        for ckpt in (False, True):
            plan = [(d, 1) for d in args.fit_depths] + [(args.fit_depths[0], 2)]
            points = []
            for d, v in plan:
                print(f"{size} text_layers={d} vision_blocks={v} checkpoint={ckpt} ...", flush=True)
                points.append(run_one(size, d, v, ckpt))
                print(f"  peak {points[-1]['peak_gib']:.2f} GiB, {points[-1]['seconds_per_step']:.0f} s", flush=True)
            peak, resident, secs = (fit(points, k) for k in ("peak_gib", "resident_gib", "seconds_per_step"))
            check = run_one(size, args.check_depth, 1, ckpt)
            check["predicted_peak_gib"] = peak(args.check_depth, 1)
            check["fit_error_gib"] = check["peak_gib"] - check["predicted_peak_gib"]
            d_full, v_full = FULL_DEPTH[size]
            report["results"] += points + [check, {
                "size": size, "text_layers": d_full, "vision_blocks": v_full, "grad_checkpoint": ckpt,
                "kind": "extrapolated", "from": [[p["text_layers"], p["vision_blocks"]] for p in points],
                "peak_gib": peak(d_full, v_full), "resident_gib": resident(d_full, v_full),
                "seconds_per_step": secs(d_full, v_full),
                "analytic_cpu_fp32_scales": analytic(size, ckpt, 4),
                "analytic_mac_bf16": analytic(size, ckpt, 2)}]
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps([r for r in report["results"] if r["kind"] == "extrapolated"], indent=2))


def _machine() -> dict:
    import os
    import platform

    import mlx.core as mx

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "mlx": mx.__version__,
            "device": str(mx.default_device()), "ld_preload": os.environ.get("LD_PRELOAD", "")}


if __name__ == "__main__":
    main()
