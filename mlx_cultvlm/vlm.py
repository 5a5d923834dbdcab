"""How the model is run: what training (lora.py), generation (generate.py) and evaluation share.

Loading a base (with or without an adapter), the vision tower's features and their merge into
the token embeddings, the LM head, and LoRA adapters (attaching, checking, loading). A second
model family plugs in here.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_vlm
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear

from .errors import CultvlmError
from .files import incomplete_safetensors
from .models import check_model_folder, resolve_model

TEXT_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

VISION_LINEARS = {"merger": ["merger.mlp.0", "merger.mlp.2"],
                  "all": ["merger.mlp.0", "merger.mlp.2", "attn.qkv", "attn.proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}


def load_model(model: str, adapter: str | None = None, models_root: str | None = None):
    """(model, processor) from a preset, folder or repo id; weights from safetensors only."""

    folder = resolve_model(model, models_root)
    check_model_folder(folder)
    model_obj, processor = mlx_vlm.load(str(folder), trust_remote_code=False)
    if adapter is not None:
        load_adapter(model_obj, folder, adapter)
    return model_obj, processor


def float32_language_model_on_cpu(model) -> None:
    """On the CPU, let the language model compute in float32 (its 4-bit weights stay 4-bit; a
    bfloat16 value is exact in float32). MLX's CPU 4-bit matmul converts bfloat16 element by
    element: one row through a 2048x11008 matrix of 3B takes 157 ms with bfloat16 activations,
    17 ms with float32 (docs/EVAL.md). The unquantized vision tower keeps its dtype: its dense
    bfloat16 matmuls are the faster ones there. On a GPU nothing changes."""
    if mx.default_device() == mx.cpu:
        model.language_model.set_dtype(mx.float32)


def image_features(model, pixel_values: mx.array, grid: mx.array) -> mx.array:
    dtype = model.vision_tower.patch_embed.proj.weight.dtype
    return model.vision_tower(pixel_values.astype(dtype), grid, output_hidden_states=False)


def image_gather_index(ids: np.ndarray, image_pad_id: int) -> np.ndarray:
    """For `with_image_features`: row i of the flattened [B*L] embeddings, or B*L + j for the
    j-th image-pad token (its image feature)."""
    image_rows = np.nonzero(ids.reshape(-1) == image_pad_id)[0]
    index = np.arange(ids.size, dtype=np.int32)
    index[image_rows] = ids.size + np.arange(len(image_rows), dtype=np.int32)
    return index


def with_image_features(embeds: mx.array, features: mx.array, gather_index: mx.array) -> mx.array:
    """The token embeddings [B, L, D] with the image-pad rows replaced by the features, in one gather."""
    B, L, D = embeds.shape
    flat = mx.concatenate([embeds.reshape(B * L, D), features.astype(embeds.dtype)])
    return flat[gather_index].reshape(B, L, D)


def lm_head(model, h: mx.array) -> mx.array:
    lm = model.language_model
    if hasattr(lm, "lm_head"):
        return lm.lm_head(h)
    return lm.model.embed_tokens.as_linear(h)


def attach_lora(model, keys: list[str], rank: int, scale: float, dropout: float) -> None:
    """Freeze the whole model and wrap each named linear in mlx-lm's LoRALinear (which also
    wraps QuantizedLinear: that is QLoRA)."""

    model.freeze()
    modules = dict(model.named_modules())
    wrapped = []
    for key in keys:
        layer = modules.get(key)
        if not isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
            raise CultvlmError(f"LoRA target {key}: not a linear layer of this model")
        wrapped.append((key, LoRALinear.from_base(layer, r=rank, dropout=dropout, scale=scale)))
    model.update_modules(tree_unflatten(wrapped))


def base_identity(model_dir: Path) -> dict:
    """What an adapter must match: the architecture and quantization of its base."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    q = config.get("quantization") or {}
    return {
        "model": str(model_dir),
        "hidden_size": config.get("hidden_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
        "vocab_size": config.get("vocab_size"),
        "vision_hidden_size": config.get("vision_config", {}).get("hidden_size"),
        "quantization": {"bits": q.get("bits"), "group_size": q.get("group_size")} if q else None,
    }


def read_adapter_weights(path: Path) -> dict:
    """An adapter's arrays, or one line saying the file is damaged or holds NaN/inf."""
    damaged = [d for d in incomplete_safetensors(path.parent) if d.startswith(path.name + " ")]
    try:
        weights = {} if damaged else mx.load(str(path))
    except (RuntimeError, ValueError, OSError) as e:
        damaged = [f"{path.name} ({str(e).splitlines()[0] if str(e) else type(e).__name__})"]
    if damaged or not weights:
        raise CultvlmError(f"{path}: damaged: {damaged[0] if damaged else 'it holds no tensors'}; copy it "
                           "again, or train again (--resume continues from the last checkpoint)")
    not_finite = [k for k, v in weights.items() if not mx.all(mx.isfinite(v)).item()]
    if not_finite:
        raise CultvlmError(f"{path}: {len(not_finite)} tensor(s) hold NaN or infinite values ({not_finite[0]}, "
                           "...): a run that diverged; train again with a lower learning_rate")
    return weights


def load_adapter(model, model_dir: Path, adapter_dir: str | Path) -> dict:
    """Attach and load a saved adapter, checking base model, names and shapes strictly."""
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / "adapter_config.json", adapter_dir / "adapters.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CultvlmError(f"{path}: missing (not an adapter folder)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        params = config["lora_parameters"]
        keys, rank, scale, dropout = params["keys"], params["rank"], params["scale"], params["dropout"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CultvlmError(f"{config_path}: not a LoRA adapter config ({e})") from None
    trained_on, here = config.get("base_model") or {}, base_identity(model_dir)
    for dim in ("hidden_size", "num_hidden_layers", "vocab_size", "vision_hidden_size"):
        if dim in trained_on and trained_on[dim] != here[dim]:
            raise CultvlmError(
                f"{adapter_dir}: trained on a different base model ({dim} {trained_on[dim]} "
                f"at {trained_on.get('model')}, this model {here[dim]} at {model_dir})")
    if "quantization" in trained_on and trained_on["quantization"] != here["quantization"]:
        print(f"note: {adapter_dir} was trained on a base quantized as {trained_on['quantization']}, "
              f"this one is {here['quantization']}; answers may differ slightly")
    modules = dict(model.named_modules())
    missing = [k for k in keys if k not in modules]
    if missing:
        raise CultvlmError(f"{adapter_dir}: adapter targets layers this model lacks: {missing[:3]}")
    attach_lora(model, keys, rank, scale, dropout)
    weights = read_adapter_weights(weights_path)
    expected = dict(tree_flatten(model.trainable_parameters()))
    problems = [f"missing {k}" for k in expected if k not in weights]
    problems += [f"unexpected {k}" for k in weights if k not in expected]
    problems += [f"{k}: shape {tuple(weights[k].shape)} != {tuple(v.shape)}"
                 for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    if problems:
        raise CultvlmError(f"{weights_path}: does not fit this model: {'; '.join(problems[:4])}"
                           + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""))
    model.load_weights(list(weights.items()), strict=False)
    model.eval()
    return config
