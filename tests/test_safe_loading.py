"""Weights come from safetensors only, and no code shipped with a checkpoint is ever run."""

import json
import shutil

import pytest
from click.testing import CliRunner

from mlx_cultvlm.cli import main
from mlx_cultvlm.models import ALLOW_PATTERNS


def test_downloads_take_no_code_and_no_pickles():
    assert not any(p.endswith((".py", ".bin", ".pt", ".pth", ".pkl", ".ckpt")) for p in ALLOW_PATTERNS)
    assert "*.safetensors" in ALLOW_PATTERNS


def test_remote_code_in_a_checkpoint_is_never_run(tiny_hf, tmp_path, image_file):
    src = tmp_path / "hf"
    shutil.copytree(tiny_hf, src)
    marker = tmp_path / "code-ran"
    # Code a hostile repo could ship, wired the way transformers' remote code is (auto_map).
    (src / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass EvilProcessor: pass\n")
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json"):
        config = json.loads((src / name).read_text())
        config["auto_map"] = {"AutoProcessor": "evil.EvilProcessor", "AutoTokenizer": ["evil.EvilProcessor", None],
                              "AutoModel": "evil.EvilProcessor", "AutoImageProcessor": "evil.EvilProcessor"}
        (src / name).write_text(json.dumps(config))
    out = tmp_path / "converted"
    result = CliRunner().invoke(main, ["convert", "--model", "tiny-4bit", "--hf-path", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert not list(out.glob("*.py"))
    result = CliRunner().invoke(main, ["generate", str(image_file), "--model", str(src), "--max-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert not marker.exists()


def test_pickled_weights_are_refused(tiny_hf, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(tiny_hf, src)
    for f in src.glob("model*.safetensors*"):
        f.unlink()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    result = CliRunner().invoke(main, ["convert", "--model", "tiny", "--hf-path", str(src), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "only safetensors are loaded" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "images/../../outside.png"])
def test_dataset_paths_stay_inside_the_dataset(tmp_path, path):
    from mlx_cultvlm.errors import CultvlmError
    from mlx_cultvlm.samples import resolve_image

    with pytest.raises(CultvlmError, match="outside the dataset folder"):
        resolve_image(tmp_path, path, "train.jsonl:1")
