"""`cultvlm convert`: Hugging Face Qwen2.5-VL weights -> an MLX folder, optionally quantized.

mlx-vlm does the conversion itself (weight renaming, conv layout, quantization). This module
adds what it lacks: a check of the source before any work, a write that never leaves a half-made model where a
loader would find it, and a record (`cultvlm_convert.json`) of what was done and what was
left unquantized.

Why the vision tower stays unquantized: mlx-vlm never quantizes it (its quantization predicate
skips vision modules), it is ~0.67 B parameters in both 3B and 7B (1.3 GB in bf16, ~0.4 GB in
4-bit: the saving is 0.9 GB of a 24 GB Mac), it runs once per image rather than once per token,
and its errors reach every image token. See docs/CONVERT.md.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

from .errors import CultvlmError
from .files import check_complete, check_out_apart, check_replaceable, model_folder, output_lock, write_json
from .models import (PRESETS, TINY_SOURCE, check_model_folder, download, looks_like_repo_id, models_dir,
                     tiny_hf_dir)

GROUP_SIZES = (32, 64, 128)


def _revision_of(folder: Path) -> str | None:
    """The commit hash when `folder` is a Hugging Face cache snapshot."""
    return folder.name if folder.parent.name == "snapshots" else None


def ensure_tiny_checkpoint() -> Path:
    """Build the offline tiny checkpoint once, atomically, under $CULTVLM_HOME."""
    from .tiny import build_tiny_qwen

    target = tiny_hf_dir()
    if (target / "config.json").is_file():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    build_tiny_qwen(partial)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(target)
    return target


def default_output(model: str, bits: int | None, models_root: str | Path | None) -> Path:
    if model in PRESETS and PRESETS[model].bits == bits:
        return models_dir(models_root) / model
    name = Path(model.rstrip("/")).name.lower()
    return models_dir(models_root) / (f"{name}-{bits}bit" if bits else name)


def _unquantized_layers(folder: Path, group_size: int, quantized: bool) -> tuple[int, list[dict]]:
    """Count quantized matrices and list the ones left in float, with why (from the saved
    tensors themselves, so the record cannot disagree with the files)."""
    from safetensors import safe_open

    shapes = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="numpy") as f:
            for key in f.keys():
                shapes[key] = f.get_slice(key).get_shape()
    n_quantized, left, vision = 0, [], 0
    for key, shape in sorted(shapes.items()):
        if not key.endswith(".weight") or len(shape) != 2:
            continue  # norms, biases, the patch-embedding convolution
        module = key[: -len(".weight")]
        if module + ".scales" in shapes:
            n_quantized += 1
        elif not quantized:
            continue
        elif module.startswith("vision_tower."):
            vision += 1
        elif shape[-1] % group_size:
            left.append({"module": module, "reason": f"input size {shape[-1]} is not a multiple "
                                                      f"of group size {group_size}"})
        else:
            left.append({"module": module, "reason": "excluded by mlx-vlm's quantization predicate"})
    if vision:
        left.insert(0, {"module": "vision_tower.* (patch embedding, blocks, merger)",
                        "matrices": vision,
                        "reason": "kept in float by design: mlx-vlm does not quantize the vision "
                                  "tower; it runs once per image and is ~0.67B params "
                                  "(docs/CONVERT.md)"})
    return n_quantized, left


def convert(model: str, hf_path: str | None = None, out: str | Path | None = None,
            bits: int | None = -1, group_size: int = 64, dtype: str | None = None,
            revision: str | None = None, force: bool = False,
            models_root: str | Path | None = None) -> Path:
    """Convert `model` (preset, repo id or folder; `hf_path` overrides the source) to MLX.
    bits=-1 means: as the preset says (4/8 for `-4bit`/`-8bit`, float otherwise)."""
    preset = PRESETS.get(model)
    if bits == -1:
        bits = preset.bits if preset else None
    if bits not in (None, 4, 8):
        raise CultvlmError(f"--bits must be 4 or 8 (or omitted for float), got {bits}")
    if group_size not in GROUP_SIZES:
        raise CultvlmError(f"--group-size must be one of {GROUP_SIZES}, got {group_size}")

    out = Path(out).expanduser() if out else default_output(model, bits, models_root)

    source = hf_path or (preset.hf_repo if preset else model)
    if source == TINY_SOURCE:
        src_dir = ensure_tiny_checkpoint()
    elif Path(source).expanduser().exists():
        src_dir = Path(source).expanduser()
        if not src_dir.is_dir():
            raise CultvlmError(f"{src_dir}: --hf-path must be a folder")
    elif looks_like_repo_id(source):
        src_dir = download(source, revision)
    else:
        raise CultvlmError(f"{source}: no such folder, and not a Hugging Face repo id")
    check_out_apart(out, "convert", source=src_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise CultvlmError(f"{out}: already exists and is not empty; pass --force to replace it")
    check_replaceable(out, "convert")
    config = check_model_folder(src_dir)

    if bits:
        text_dims = [config["hidden_size"], config["intermediate_size"]]
        bad = [d for d in text_dims if d % group_size]
        if bad:
            print(f"warning: group size {group_size} does not divide text dims {bad}: "
                  "those layers stay unquantized (see cultvlm_convert.json)")

    out.parent.mkdir(parents=True, exist_ok=True)
    from mlx_vlm.convert import convert as mlx_vlm_convert

    with output_lock(out, "convert"), model_folder(out, "conversion", "convert") as partial:
        mlx_vlm_convert(str(src_dir), str(partial), quantize=bits is not None, q_bits=bits or 4,
                        q_group_size=group_size, dtype=dtype, trust_remote_code=False)
        check_complete(partial)  # before reading the shards back below
        # mlx-vlm copies every *.py of the source; a converted model needs none, and we never
        # run remote code.
        for script in partial.glob("*.py"):
            script.unlink()
        n_quantized, left = _unquantized_layers(partial, group_size, bits is not None)
        record = {
            "source": source if source != TINY_SOURCE else "tiny (built offline by mlx_cultvlm.tiny)",
            "source_folder": str(src_dir),
            "revision": revision or _revision_of(src_dir),
            "bits": bits,
            "group_size": group_size if bits else None,
            "dtype": dtype or config.get("torch_dtype"),
            "quantized_matrices": n_quantized,
            "left_unquantized": left,
            "converted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
        }
        write_json(partial / "cultvlm_convert.json", record)
    return out


def _versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("cultvlm", "mlx", "mlx-vlm")}
