"""Shared fixtures: a tiny Qwen2.5-VL built offline, its conversions, generated images.

Everything lives under a temporary CULTVLM_HOME / HF_HOME: no test reads ~/.cache, ../shared
or the network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# huggingface_hub reads HF_HOME and HF_HUB_OFFLINE once, when first imported: set them first.
assert "huggingface_hub" not in sys.modules, "conftest must set HF_HOME before huggingface_hub loads"
_HOME = Path(tempfile.mkdtemp(prefix="cultvlm-tests-"))
os.environ.update(CULTVLM_HOME=str(_HOME), HF_HOME=str(_HOME / "hf_home"), HF_HUB_OFFLINE="1",
                  HF_HUB_DISABLE_TELEMETRY="1")
os.environ.pop("CULTVLM_MODELS_DIR", None)

import numpy as np
import pytest
from PIL import Image

from mlx_cultvlm.generate import stream_answer
from mlx_cultvlm.lora import load_config, train
from mlx_cultvlm.tiny import build_tiny_qwen
from synthetic import QUESTION, make_dataset


@pytest.fixture(scope="session", autouse=True)
def isolated_home():
    """CULTVLM_HOME and HF_HOME of this test session; removed at the end."""
    yield _HOME
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    """The tiny checkpoint in Hugging Face layout (bf16 shards, as the real repos)."""
    return build_tiny_qwen(tmp_path_factory.mktemp("tiny") / "tiny-hf")


@pytest.fixture(scope="session")
def tiny_fp32(tiny_hf, tmp_path_factory) -> Path:
    from mlx_cultvlm.convert import convert

    return convert("tiny", hf_path=str(tiny_hf), out=tmp_path_factory.mktemp("c") / "fp32",
                   bits=None, dtype="float32")


@pytest.fixture(scope="session")
def tiny_4bit(tiny_hf, tmp_path_factory) -> Path:
    from mlx_cultvlm.convert import convert

    return convert("tiny-4bit", hf_path=str(tiny_hf), out=tmp_path_factory.mktemp("c") / "q4")


def make_image(path: Path, width: int = 320, height: int = 240, seed: int = 0) -> Path:
    """A deterministic picture with structure (gradients + blocks), saved as given by suffix."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                    np.full_like(x, 128)], axis=-1).astype(np.uint8)
    for _ in range(6):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        img[y0:y0 + height // 5, x0:x0 + width // 5] = rng.integers(0, 256, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


@pytest.fixture
def image_file(tmp_path) -> Path:
    return make_image(tmp_path / "picture.jpg")


def lay_out_hf_cache(src: Path, hf_home: Path, repo_id: str, commit: str = "a" * 40) -> Path:
    """Put a local checkpoint into a Hugging Face cache exactly as snapshot_download leaves it
    (blobs named by hash, snapshot symlinks, refs/main), so the real hub code resolves it."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        shutil.copyfile(f, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


# ---- a trained adapter on synthetic entities (shared by the LoRA, eval and report tests)

PIXELS = 112 * 112  # 16 image tokens per picture
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    items = make_dataset(root, {"train": 8, "valid": 2, "test": 4})
    return root, items


def config(model, data, out, **overrides):
    options = dict(model=str(model), data=str(data), out=str(out), max_pixels=PIXELS, rank=8,
                   alpha=16, dropout=0.0, learning_rate=1e-3, warmup_steps=5, batch_size=4,
                   targets=TARGETS, val_every=40, save_every=40, steps=200)
    options.update(overrides)
    return load_config(None, options)


def accuracy(model, processor, items):
    answers = ["".join(stream_answer(model, processor, path, QUESTION, max_tokens=10, max_pixels=PIXELS))
               for path, _ in items]
    return sum(name in answer for (_, name), answer in zip(items, answers)), answers


@pytest.fixture(scope="session")
def trained(tiny_4bit, dataset, tmp_path_factory):
    root, items = dataset
    start = time.perf_counter()
    result = train(config(tiny_4bit, root, tmp_path_factory.mktemp("run") / "adapters"), progress=False)
    result.seconds = time.perf_counter() - start
    return result
