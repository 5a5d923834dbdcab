"""What differs between a GPU (Metal on a Mac, or MLX's CUDA backend) and the CPU: the CPU-only
branches stay off when the default device is a GPU, the Metal-only call only runs on Metal.
docs/REHEARSAL.md lists the branches."""

import os

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_cultvlm import demo, evaluate, lora, vlm


@pytest.fixture
def on_gpu(monkeypatch):
    """The default device a GPU, as on a Mac or with mlx[cuda]; no Metal (CUDA)."""
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(evaluate, "cpu_cores", lambda: 8)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.language_model = nn.Linear(4, 4)
        self.language_model.set_dtype(mx.bfloat16)


def test_language_model_stays_bf16_on_a_gpu(on_gpu):
    model = _Model()
    vlm.float32_language_model_on_cpu(model)
    assert model.language_model.weight.dtype == mx.bfloat16


def test_language_model_goes_float32_on_the_cpu(monkeypatch):
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    model = _Model()
    vlm.float32_language_model_on_cpu(model)
    assert model.language_model.weight.dtype == mx.float32


def test_one_stream_one_process_and_mlx_defaults_on_a_gpu(on_gpu, monkeypatch):
    monkeypatch.delenv("MLX_BFS_MAX_WIDTH", raising=False)
    assert evaluate.picture_workers(10) == 1
    evaluate.let_cpu_streams_overlap()
    assert "MLX_BFS_MAX_WIDTH" not in os.environ
    assert demo.training_ranks() == 1


def test_cpu_shares_pictures_among_its_cores(monkeypatch):
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    monkeypatch.setattr(evaluate, "cpu_cores", lambda: 2)
    monkeypatch.delenv("MLX_BFS_MAX_WIDTH", raising=False)
    assert [evaluate.picture_workers(n) for n in (0, 1, 2, 5)] == [1, 1, 2, 2]
    evaluate.let_cpu_streams_overlap()
    assert os.environ["MLX_BFS_MAX_WIDTH"] == "200"


def test_wired_limit_only_on_metal(monkeypatch):
    calls = []
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n))
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 17 * 2**30})
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)  # CPU, or CUDA
    lora.wire_weights()
    assert calls == []
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)  # a Mac
    lora.wire_weights()
    assert calls == [17 * 2**30]
