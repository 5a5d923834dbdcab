"""Loading user images safely and sizing them by a pixel budget on Qwen2.5-VL's 28-pixel grid.

Qwen2.5-VL cuts an image into 14-pixel patches and merges 2x2 of them into one token, so the
sides must be multiples of 28 and an H x W image costs (H/28) * (W/28) tokens (448² -> 256).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import CultvlmError
from .files import printable

PATCH = 14
MERGE = 2
FACTOR = PATCH * MERGE  # 28
DEFAULT_MAX_PIXELS = 448 * 448  # 256 image tokens
DEFAULT_MIN_PIXELS = 56 * 56  # Qwen's own minimum (4 tokens)
QWEN_MAX_PIXELS = 12845056  # the image processor's upper limit; above it, it would resize again


def check_budget(min_pixels: int, max_pixels: int) -> None:
    if not FACTOR * FACTOR <= min_pixels <= max_pixels <= QWEN_MAX_PIXELS:
        raise CultvlmError(
            f"pixel budget must satisfy {FACTOR * FACTOR} <= min_pixels ({min_pixels}) "
            f"<= max_pixels ({max_pixels}) <= {QWEN_MAX_PIXELS}")


# ISO-BMFF brands of still-image formats Pillow has no decoder for (without a plugin).
UNDECODABLE_BRANDS = {
    **dict.fromkeys((b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"),
                    "HEIC/HEIF"),
    **dict.fromkeys((b"avif", b"avis"), "AVIF"),
}


def unsupported_format(path: Path) -> str | None:
    """'HEIC/HEIF' or 'AVIF' when the file starts with such an ISO-BMFF 'ftyp' box (an iPhone
    photo, say), else None."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head[4:8] != b"ftyp":
        return None
    brands = [head[8:12]] + [head[i:i + 4] for i in range(16, min(len(head), 64) - 3, 4)]
    return next((UNDECODABLE_BRANDS[b] for b in brands if b in UNDECODABLE_BRANDS), None)


def load_image(path: str | Path) -> Image.Image:
    """Decode the whole file (not just the header), apply EXIF rotation, return RGB."""
    path = Path(path)
    shown = printable(path)  # a name that is not UTF-8 shows as \xNN, and prints anywhere
    if not path.is_file():
        raise CultvlmError(f"{shown}: no such image file")
    if path.stat().st_size == 0:
        raise CultvlmError(f"{shown}: empty file (0 bytes)")
    try:
        with Image.open(path) as img:
            img.load()  # decodes every byte: a truncated file fails here, not later
            img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I"):
                # 16-bit (or 32-bit int) grey: Pillow's convert("RGB") clips it to white.
                # Scale by the format's range instead.
                values = np.asarray(img, dtype=np.float64)
                top = 65535.0 if img.mode.startswith("I;16") or values.max() > 255 else 255.0
                img = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
            if img.mode in ("RGBA", "LA", "P", "PA"):
                # Transparent pixels are undefined colour underneath: put them on white.
                rgba = img.convert("RGBA")
                img = Image.new("RGB", rgba.size, (255, 255, 255))
                img.paste(rgba, mask=rgba.getchannel("A"))
            else:
                img = img.convert("RGB")
    except UnidentifiedImageError:
        kind = unsupported_format(path)
        if kind:
            raise CultvlmError(f"{shown}: {kind} image, which Pillow cannot decode here; "
                               "convert it to JPEG or PNG") from None
        raise CultvlmError(f"{shown}: not an image Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise CultvlmError(f"{shown}: refused, too many pixels ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise CultvlmError(f"{shown}: cannot decode image ({e})") from None
    return img


def grid_size(height: int, width: int, min_pixels: int = DEFAULT_MIN_PIXELS,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Qwen2.5-VL's `smart_resize`: the nearest (H, W) in multiples of 28 within the budget,
    keeping the aspect ratio."""
    if max(height, width) / min(height, width) > 200:
        raise CultvlmError(f"aspect ratio {max(height, width) / min(height, width):.0f}:1 is over Qwen's 200:1 limit")
    h = max(FACTOR, round(height / FACTOR) * FACTOR)
    w = max(FACTOR, round(width / FACTOR) * FACTOR)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(FACTOR, math.floor(height / beta / FACTOR) * FACTOR)
        w = max(FACTOR, math.floor(width / beta / FACTOR) * FACTOR)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / FACTOR) * FACTOR
        w = math.ceil(width * beta / FACTOR) * FACTOR
    return h, w


def num_image_tokens(height: int, width: int) -> int:
    """Tokens an image of this (already gridded) size occupies in the prompt."""
    return (height // PATCH) * (width // PATCH) // (MERGE * MERGE)


def fit_to_budget(img: Image.Image, min_pixels: int = DEFAULT_MIN_PIXELS,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Resize to the grid size, so the model's processor has nothing left to change."""
    return resize_exactly(img, *grid_size(img.height, img.width, min_pixels, max_pixels))


def resize_exactly(img: Image.Image, height: int, width: int) -> Image.Image:
    if (height, width) == (img.height, img.width):
        return img
    return img.resize((width, height), Image.Resampling.BICUBIC)
