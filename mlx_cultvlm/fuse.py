"""`cultvlm fuse`: merge LoRA adapters into the base and write a plain model folder.

The result loads with stock `mlx_vlm.load` and needs no cultvlm code. By default quantized
layers are re-quantized after merging (same bits and group size as the base, so the folder
stays small); `--dequantize` writes float16 weights instead, which keeps the merge exact up to
float16 rounding.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_vlm.utils import save_config, save_weights

from .data.check import TRAINED_ON
from .errors import CultvlmError
from .files import check_out_apart, check_replaceable, model_folder, output_lock, write_json
from .models import resolve_model
from .vlm import load_model

# Tokenizer, chat template and processor files to carry over from the base folder.
SIDE_FILES = ("*.json", "*.txt", "*.jinja")
NOT_COPIED = {"config.json", "model.safetensors.index.json", "cultvlm_convert.json"}


def fuse(model: str, adapter: str, out: str | Path, dequantize: bool = False, force: bool = False,
         models_root: str | None = None) -> Path:
    out = Path(out)
    base_dir = resolve_model(model, models_root)
    check_out_apart(out, "fuse", model=base_dir, adapter=adapter)
    if out.exists() and any(out.iterdir()) and not force:
        raise CultvlmError(f"{out}: already exists and is not empty; pass --force to replace it")
    check_replaceable(out, "fuse")
    model_obj, _ = load_model(str(base_dir), adapter, models_root)

    # One layer at a time, each merged layer evaluated and put in place before the next, so that
    # only one layer's float32 sum and never two copies of the weights exist (3B: a 4.12 GiB peak
    # merging them all first, docs/REHEARSAL.md).
    fused = [name for name, module in model_obj.named_modules() if isinstance(module, LoRALinear)]
    for name in fused:
        layer = merge_lora(dict(model_obj.named_modules())[name], dequantize)
        mx.eval(layer.parameters())
        model_obj.update_modules(tree_unflatten([(name, layer)]))
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    if dequantize:
        _dequantize_all(model_obj)
        model_obj.update(tree_map(lambda p: p.astype(mx.float16) if mx.issubdtype(p.dtype, mx.floating) else p,
                                  model_obj.parameters()))
        config.pop("quantization", None)
        config.pop("quantization_config", None)
        config["torch_dtype"] = "float16"

    with output_lock(out, "fuse"), model_folder(out, "fusing", "fuse") as partial:
        partial.mkdir(parents=True)
        save_weights(partial, model_obj, donate_weights=True)
        for pattern in SIDE_FILES:
            for f in base_dir.glob(pattern):
                if f.name not in NOT_COPIED:
                    shutil.copy2(f, partial / f.name)
        save_config(config, config_path=partial / "config.json")
        # The adapter's record of its training pictures covers the base's too; its training log
        # lets a report on the fused model show the loss curves.
        for record in (TRAINED_ON, "train_log.jsonl"):
            if (Path(adapter) / record).is_file():
                shutil.copy2(Path(adapter) / record, partial / record)
        write_json(partial / "cultvlm_fuse.json", {
            "base_model": str(base_dir),
            "adapter": str(Path(adapter).resolve()),
            "adapter_config": json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8")),
            "fused_layers": len(fused),
            "dequantized": dequantize,
            "fused_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
    return out


def merge_lora(lora, dequantize: bool):
    """W + scale * (A @ B)^T as one linear layer. The sum is formed in float32 (mlx-lm's own
    fuse adds in the base dtype: a bf16 sum alone moved the tiny model's logits by 0.3);
    a quantized base is re-quantized with its own bits and group size unless `dequantize`."""
    base = lora.linear
    quantized = isinstance(base, nn.QuantizedLinear)
    dtype = base.scales.dtype if quantized else base.weight.dtype
    weight = dequantize_exactly(base) if quantized else base.weight.astype(mx.float32)
    merged = weight + (lora.scale * lora.lora_b.T) @ lora.lora_a.T
    layer = nn.Linear(merged.shape[1], merged.shape[0], bias="bias" in base)
    layer.weight = merged
    if "bias" in base:
        layer.bias = base.bias
    if quantized and not dequantize:
        # Quantize the float32 sum, then store scales in the base's dtype. Lossy: a LoRA
        # update smaller than the 4-bit step is partly rounded away (docs/TRAINING.md).
        layer = nn.QuantizedLinear.from_linear(layer, base.group_size, base.bits, mode=base.mode)
        layer.scales, layer.biases = layer.scales.astype(dtype), layer.biases.astype(dtype)
    elif not dequantize:
        layer.weight = merged.astype(dtype)
    return layer


def dequantize_exactly(layer) -> mx.array:
    """The float32 weight of a quantized layer. Dequantizing with bf16 scales would round
    every weight to bf16 (an error of ~6e-5 on weights of ~0.02 in the tiny model)."""
    return mx.dequantize(layer.weight, layer.scales.astype(mx.float32), layer.biases.astype(mx.float32),
                         group_size=layer.group_size, bits=layer.bits, mode=layer.mode)


def _dequantize_all(model) -> None:
    """Replace every remaining quantized linear/embedding with its float equivalent."""
    replaced = []
    for name, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            weight = dequantize_exactly(module)
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
            layer.weight = weight
            if "bias" in module:
                layer.bias = module.bias
            replaced.append((name, layer))
        elif isinstance(module, nn.QuantizedEmbedding):
            weight = dequantize_exactly(module)
            layer = nn.Embedding(*weight.shape)
            layer.weight = weight
            replaced.append((name, layer))
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    # Nothing quantized may remain, or the saved config would lie.
    assert not any(k.endswith(".scales") for k, _ in tree_flatten(model.parameters()))
