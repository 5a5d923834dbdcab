"""Model presets, where converted models live, and how a `--model` argument is resolved.

`--model` takes a preset (`7b-4bit`), a local folder (MLX or Hugging Face layout), or a Hugging
Face repo id (`Qwen/Qwen2.5-VL-3B-Instruct`, downloaded to the Hugging Face cache).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CultvlmError
from .files import incomplete_safetensors

TINY_SOURCE = "tiny"  # built offline by mlx_cultvlm.tiny instead of downloaded


@dataclass(frozen=True)
class Preset:
    name: str
    hf_repo: str  # Hugging Face repo id, or TINY_SOURCE
    bits: int | None  # None: keep the checkpoint's float dtype


def _presets() -> dict[str, Preset]:
    sources = {
        "3b": "Qwen/Qwen2.5-VL-3B-Instruct",
        "7b": "Qwen/Qwen2.5-VL-7B-Instruct",
        "tiny": TINY_SOURCE,
    }
    presets = {}
    for size, repo in sources.items():
        presets[size] = Preset(size, repo, None)
        for bits in (4, 8):
            presets[f"{size}-{bits}bit"] = Preset(f"{size}-{bits}bit", repo, bits)
    return presets


PRESETS = _presets()


def cultvlm_home() -> Path:
    """Root of everything cultvlm caches: $CULTVLM_HOME, default ~/.cache/cultvlm."""
    return Path(os.environ.get("CULTVLM_HOME", Path.home() / ".cache" / "cultvlm")).expanduser()


def models_dir(override: str | Path | None = None) -> Path:
    """Where converted models live: --models-dir, else $CULTVLM_MODELS_DIR, else $CULTVLM_HOME/models."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("CULTVLM_MODELS_DIR"):
        return Path(os.environ["CULTVLM_MODELS_DIR"]).expanduser()
    return cultvlm_home() / "models"


def tiny_hf_dir() -> Path:
    """Where the offline tiny checkpoint (Hugging Face layout) is built on first use."""
    return cultvlm_home() / "hf" / "tiny"


def looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def read_config(folder: Path) -> dict:
    """config.json of a model folder, checked to be a Qwen2.5-VL."""
    path = folder / "config.json"
    if not path.is_file():
        raise CultvlmError(f"{path}: missing (not a model folder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CultvlmError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CultvlmError(f"{path}: expected a JSON object")
    if config.get("model_type") != "qwen2_5_vl":
        raise CultvlmError(
            f"{path}: model_type is {config.get('model_type')!r}, cultvlm supports 'qwen2_5_vl'")
    if "vision_config" not in config:
        raise CultvlmError(f"{path}: no vision_config")
    return config


def check_model_folder(folder: Path) -> dict:
    """Fail with one clear line if `folder` is not a complete Qwen2.5-VL checkpoint."""
    config = read_config(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CultvlmError(f"{index}: not a valid safetensors index ({e})") from None
        for shard in sorted(shards):
            if not (folder / shard).is_file():
                raise CultvlmError(f"{folder / shard}: safetensors shard listed in {index.name} is missing")
    elif not list(folder.glob("*.safetensors")):
        raise CultvlmError(f"{folder}: no *.safetensors weights (only safetensors are loaded)")
    short = incomplete_safetensors(folder)  # headers only: cheap
    if short:
        raise CultvlmError(f"{folder}: incomplete weights {', '.join(short)} -- an interrupted download or "
                           "copy? Fetch them again")
    return config


def resolve_model(model: str, models_root: str | Path | None = None) -> Path:
    """The local folder for a --model argument, downloading a repo id if needed."""
    if model in PRESETS:
        folder = models_dir(models_root) / model
        if not (folder / "config.json").is_file():
            raise CultvlmError(
                f"model {model!r} is not converted yet ({folder} has no config.json): "
                f"run `cultvlm convert --model {model}`")
        return folder
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CultvlmError(f"{path}: --model must be a folder, a preset or a repo id")
        return path
    if looks_like_repo_id(model):
        from .convert import download

        return download(model)
    raise CultvlmError(
        f"unknown model {model!r}: not a preset ({', '.join(PRESETS)}), "
        "an existing folder, or a Hugging Face repo id")


def real_config(size: str) -> dict:
    """config.json of Qwen2.5-VL-3B/7B-Instruct (the fields that shape the model), to build the
    real architecture with random weights for memory and speed measurements without a download."""
    text = {
        "3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                   num_key_value_heads=2, intermediate_size=11008, vocab_size=151936,
                   tie_word_embeddings=True),
        "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                   tie_word_embeddings=False),
    }[size]
    return {
        "model_type": "qwen2_5_vl", **text, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 128000, "torch_dtype": "bfloat16",
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "vision_token_id": 151654, "eos_token_id": 151645,
        "vision_config": {
            "model_type": "qwen2_5_vl", "depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
            "num_heads": 16, "in_chans": 3, "out_hidden_size": text["hidden_size"], "patch_size": 14,
            "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2,
        },
    }


def build_random_model(config: dict):
    """An mlx-vlm Qwen2.5-VL with random, still unevaluated (lazy) weights: no memory is used
    until something evaluates them."""
    from mlx_vlm.models import qwen2_5_vl
    from mlx_vlm.utils import update_module_configs

    config = json.loads(json.dumps(config))  # from_dict edits its argument
    model_config = qwen2_5_vl.ModelConfig.from_dict(config)
    model_config = update_module_configs(model_config, qwen2_5_vl, config, ["text", "vision"])
    return qwen2_5_vl.Model(model_config)
