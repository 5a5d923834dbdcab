"""Model presets, where converted models live, and how a `--model` argument is resolved.

`--model` takes a preset (`7b-4bit`), a local folder (MLX or Hugging Face layout), or a Hugging
Face repo id (`Qwen/Qwen2.5-VL-3B-Instruct`, downloaded to the Hugging Face cache: safetensors and
configs only, with a clear error offline).
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
    shapes = _tensor_shapes(folder, index)
    problem = _disagreement(config, shapes)
    if problem:
        raise CultvlmError(f"{folder}: config.json and the weights disagree: {problem}")
    return config


def _tensor_shapes(folder: Path, index: Path) -> dict[str, tuple]:
    """name -> shape of every tensor, from the shards' headers; checks the index against them."""
    from safetensors import safe_open

    shapes, where = {}, {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="numpy") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
                where[key] = shard.name
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        for name, shard in sorted(weight_map.items()):
            if where.get(name) != shard:
                raise CultvlmError(f"{index}: says {name} is in {shard}, which does not hold it")
    return shapes


# (what the config says, how to find it in the weights) -- by name suffix, so that the hub's
# layout ("model.layers.0...", "visual.blocks...") and MLX's ("language_model.model.layers...",
# "vision_tower.blocks...") are both read; quantization packs only the last dimension.
_SHAPE_CHECKS = (  # field, tensor (suffix pattern), what its first dimension is
    ("hidden_size", r"layers\.0\.input_layernorm\.weight$", "an input_layernorm"),
    ("intermediate_size", r"layers\.0\.mlp\.gate_proj\.weight$", "a gate_proj"),
    ("vocab_size", r"embed_tokens\.weight$", "embed_tokens"),
    ("vision_config.hidden_size", r"blocks\.0\.norm1\.weight$", "a vision norm1"),
    ("vision_config.intermediate_size", r"blocks\.0\.mlp\.gate_proj\.weight$", "a vision gate_proj"),
    ("vision_config.out_hidden_size", r"merger\.mlp\.2\.weight$", "the merger's output"),
)


def _disagreement(config: dict, shapes: dict[str, tuple]) -> str | None:
    import re

    def value(field):
        obj = config
        for part in field.split("."):
            obj = obj.get(part) if isinstance(obj, dict) else None
        return obj

    def count(pattern):
        found = {int(m.group(1)) for k in shapes if (m := re.search(pattern, k))}
        return max(found) + 1 if found else 0

    for field, pattern, what in (("num_hidden_layers", r"(?:^|\.)layers\.(\d+)\.", "decoder layers"),
                                 ("vision_config.depth", r"(?:^|\.)blocks\.(\d+)\.", "vision blocks")):
        if value(field) != count(pattern):
            return f"{field} is {value(field)} but the weights have {count(pattern)} {what}"
    for field, pattern, tensor in _SHAPE_CHECKS:
        hits = [shape for k, shape in shapes.items() if re.search(pattern, k)]
        if hits and value(field) != hits[0][0]:
            return f"{field} is {value(field)} but {tensor} in the weights has {hits[0][0]} rows"
    if not config.get("tie_word_embeddings", False) and not any(k.endswith("lm_head.weight") for k in shapes):
        return "tie_word_embeddings is false but the weights have no lm_head"
    return None


# Weights, configs and tokenizer files only: no code (*.py) and no pickles (*.bin, *.pt).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja"]


def download(repo_id: str, revision: str | None = None) -> Path:
    """snapshot_download (resumable, with progress) into the Hugging Face cache."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError:
        include = " ".join(f'--include "{p}"' for p in ALLOW_PATTERNS)
        raise CultvlmError(
            f"{repo_id}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub "
            f"cannot be reached (offline?). Download it where there is internet with "
            f"`hf download {repo_id} {include}` and copy the cache here, or pass a local "
            f"folder with --hf-path") from None
    except HfHubHTTPError as e:
        raise CultvlmError(f"{repo_id}: Hugging Face Hub refused the download ({e})") from None


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
        return download(model)
    raise CultvlmError(
        f"unknown model {model!r}: not a preset ({', '.join(PRESETS)}), "
        "an existing folder, or a Hugging Face repo id")


def real_config(size: str) -> dict:
    """config.json of Qwen/Qwen2.5-VL-3B-Instruct or -7B-Instruct, every field as the hub repos
    have it: to build the real architecture with random weights (memory and speed measurements,
    `scripts/make_full_checkpoint.py`) without a download."""
    text = {
        "3b": dict(hidden_size=2048, intermediate_size=11008, max_window_layers=70,
                   num_attention_heads=16, num_hidden_layers=36, num_key_value_heads=2,
                   tie_word_embeddings=True, vocab_size=151936),
        "7b": dict(hidden_size=3584, intermediate_size=18944, max_window_layers=28,
                   num_attention_heads=28, num_hidden_layers=28, num_key_value_heads=4,
                   tie_word_embeddings=False, vocab_size=152064),
    }[size]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
        "video_token_id": 151656, "hidden_act": "silu", "initializer_range": 0.02,
        "max_position_embeddings": 128000, "model_type": "qwen2_5_vl", "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
        **text,
        "vision_config": {
            "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
            "num_heads": 16, "in_chans": 3, "out_hidden_size": text["hidden_size"], "patch_size": 14,
            "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
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
