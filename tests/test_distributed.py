"""Data-parallel training with mx.distributed: 2 processes on 127.0.0.1 (ring backend, started
by `mlx.launch` as a user would across Macs) equal one process with the same global batch."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

BIN = Path(sys.executable).parent
COMMON = ["--steps", "4", "--dropout", "0", "--max-pixels", str(112 * 112), "--rank", "4",
          "--save-every", "2", "--learning-rate", "1e-3"]


def launch(*args, log: Path, timeout=600):
    """2 ranks on this machine through mlx.launch's ring backend (output to a file: with pipes
    the launcher's relay competes for the 2 cores)."""
    with open(log, "w") as f:
        result = subprocess.run([str(BIN / "mlx.launch"), "--backend", "ring", "-n", "2", "--", *map(str, args)],
                                stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    output = log.read_text()
    assert result.returncode == 0, output[-3000:]
    return output


def losses(out):
    return [json.loads(x)["loss"] for x in (Path(out) / "train_log.jsonl").read_text().splitlines()]


def test_two_ranks_equal_one_process_and_resume(tiny_4bit, dataset, tmp_path):
    root, _ = dataset
    base = ["--model", tiny_4bit, "--data", root, *COMMON]
    # Dropout off: each rank draws its own masks, so only then are the runs the same computation.
    single = subprocess.run([str(BIN / "cultvlm"), "lora", *map(str, base), "--out", str(tmp_path / "single"),
                             "--batch-size", "4"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr
    output = launch(BIN / "cultvlm", "lora", *base, "--out", tmp_path / "dist", "--batch-size", "2", "--distributed",
                    log=tmp_path / "dist.log")
    assert "data parallel over 2 processes" in output
    # The ranks sum their gradients in another order than one process: the losses agree to the
    # rounding of bfloat16 activations (1e-6 on the first steps; 9e-5 seen at step 4).
    np.testing.assert_allclose(losses(tmp_path / "dist"), losses(tmp_path / "single"), rtol=2e-4)
    a = mx.load(str(tmp_path / "single" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "dist" / "adapters.safetensors"))
    # AdamW's first steps are about lr x sign(gradient), and LoRA's A gradients start near zero
    # (B starts at zero): rounding (bfloat16 activations, summed in another order) flips some of
    # their signs and moves those weights by up to a step. So the adapters are compared by what
    # they do -- the validation loss -- and the weights to within a step (lr 1e-3).
    val = [json.loads(x)["val_loss"] for x in ((tmp_path / r / "train_log.jsonl").read_text().splitlines()[-1]
                                               for r in ("dist", "single"))]
    assert abs(val[0] - val[1]) < 1e-3 * val[1], val
    for key in a:
        np.testing.assert_allclose(np.array(b[key]), np.array(a[key]), atol=1e-3)

    # Stopped after 2 steps (checkpoint at step 2), then resumed by both ranks from rank 0's checkpoint.
    script = ("import sys; from mlx_cultvlm.lora import load_config, train; "
              "train(load_config(None, dict(model=sys.argv[1], data=sys.argv[2], out=sys.argv[3], steps=4, "
              "dropout=0.0, max_pixels=112*112, rank=4, save_every=2, learning_rate=1e-3, batch_size=2, "
              "distributed=True)), stop_after=2, progress=False)")
    launch(sys.executable, "-c", script, tiny_4bit, root, tmp_path / "cut", log=tmp_path / "cut.log")
    assert len(losses(tmp_path / "cut")) == 2
    launch(BIN / "cultvlm", "lora", *base, "--out", tmp_path / "cut", "--batch-size", "2", "--distributed", "--resume",
           log=tmp_path / "resume.log")
    np.testing.assert_allclose(losses(tmp_path / "cut"), losses(tmp_path / "single"), rtol=2e-4)
