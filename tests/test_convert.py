"""`cultvlm convert`: real conversion of the tiny checkpoint, the hub path, and bad input."""

import json
import shutil
import time

import mlx.core as mx
import mlx.nn as nn
import mlx_vlm
import pytest
from click.testing import CliRunner

from conftest import lay_out_hf_cache
from mlx_cultvlm.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_4bit_folder_loads_with_stock_mlx_vlm_and_records_what_was_done(tiny_4bit):
    model, _ = mlx_vlm.load(str(tiny_4bit))
    lm_layer = model.language_model.model.layers[0]
    assert isinstance(lm_layer.self_attn.q_proj, nn.QuantizedLinear)
    assert lm_layer.self_attn.q_proj.bits == 4 and lm_layer.self_attn.q_proj.group_size == 64
    assert isinstance(model.language_model.lm_head, nn.QuantizedLinear)
    assert isinstance(model.vision_tower.blocks[0].attn.qkv, nn.Linear)  # kept in float
    assert not list(tiny_4bit.glob("*.py"))

    record = json.loads((tiny_4bit / "cultvlm_convert.json").read_text())
    assert record["bits"] == 4 and record["group_size"] == 64
    # 2 layers x 7 linears + embedding + lm_head
    assert record["quantized_matrices"] == 16
    (vision,) = record["left_unquantized"]
    assert vision["module"].startswith("vision_tower") and vision["matrices"] == 12


def test_float_conversion_keeps_requested_dtype(tiny_fp32):
    model, _ = mlx_vlm.load(str(tiny_fp32))
    assert model.language_model.model.layers[0].mlp.up_proj.weight.dtype == mx.float32
    record = json.loads((tiny_fp32 / "cultvlm_convert.json").read_text())
    assert record["bits"] is None and record["quantized_matrices"] == 0 and record["left_unquantized"] == []


def test_cli_preset_builds_tiny_and_refuses_to_overwrite(isolated_home):
    result = run("convert", "--model", "tiny-4bit", "--group-size", "32")
    assert result.exit_code == 0, result.output
    out = isolated_home / "models" / "tiny-4bit"
    assert json.loads((out / "cultvlm_convert.json").read_text())["group_size"] == 32
    before = (out / "model.safetensors").read_bytes()

    again = run("convert", "--model", "tiny-4bit")
    assert again.exit_code != 0 and "--force" in again.output and str(out) in again.output
    assert (out / "model.safetensors").read_bytes() == before  # nothing lost

    forced = run("convert", "--model", "tiny-4bit", "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "cultvlm_convert.json").read_text())["group_size"] == 64
    assert not list(out.parent.glob(".tiny-4bit.*"))  # no partial or old folder left behind


def test_hub_path_resolves_from_the_hf_cache_offline(tiny_hf, isolated_home, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    lay_out_hf_cache(tiny_hf, isolated_home / "hf_home", "Qwen/Qwen2.5-VL-Tiny", commit)
    out = tmp_path / "from-hub"
    result = run("convert", "--model", "Qwen/Qwen2.5-VL-Tiny", "--bits", "4", "--out", str(out))
    assert result.exit_code == 0, result.output
    record = json.loads((out / "cultvlm_convert.json").read_text())
    assert record["source"] == "Qwen/Qwen2.5-VL-Tiny" and record["revision"] == commit
    mlx_vlm.load(str(out))


def test_offline_without_cache_fails_fast_with_instructions(tmp_path):
    start = time.monotonic()
    result = run("convert", "--model", "7b-4bit", "--out", str(tmp_path / "m"))
    assert time.monotonic() - start < 30  # a clear no, never a hang
    assert result.exit_code == 1
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in result.output and "hf download" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "m").exists()


def _edit_json(path, edit):
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _broken_copy(tiny_hf, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_hf, src)
    return src


@pytest.mark.parametrize("breakage,expected", [
    (lambda d: (d / "config.json").unlink(), "config.json: missing"),
    (lambda d: (d / "config.json").write_text("{not json"), "config.json: not valid JSON"),
    (lambda d: (d / "model-00002-of-00003.safetensors").unlink(),
     "model-00002-of-00003.safetensors: safetensors shard listed in model.safetensors.index.json is missing"),
    (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "llama"})),
     "model_type is 'llama'"),
    (lambda d: _edit_json(d / "model.safetensors.index.json",
                          lambda i: i["weight_map"].update({"lm_head.weight": "model-00009-of-00009.safetensors"})),
     "model-00009-of-00009.safetensors: safetensors shard listed in model.safetensors.index.json is missing"),
    (lambda d: _edit_json(d / "model.safetensors.index.json",
                          lambda i: i["weight_map"].update({"extra.weight": "model-00001-of-00003.safetensors"})),
     "says extra.weight is in model-00001-of-00003.safetensors, which does not hold it"),
    (lambda d: _truncate(d / "model-00003-of-00003.safetensors"), "incomplete weights model-00003-of-00003"),
    (lambda d: (d / "model-00003-of-00003.safetensors").write_bytes(b""), "model-00003-of-00003.safetensors (not a"),
    (lambda d: _edit_json(d / "config.json", lambda c: c.update(num_hidden_layers=3)),
     "config.json and the weights disagree: num_hidden_layers is 3 but the weights have 2 decoder layers"),
    (lambda d: _edit_json(d / "config.json", lambda c: c.update(intermediate_size=256)),
     "intermediate_size is 256 but a gate_proj in the weights has 128 rows"),
    (lambda d: _edit_json(d / "config.json", lambda c: c["vision_config"].update(depth=4)),
     "vision_config.depth is 4 but the weights have 2 vision blocks"),
])
def test_bad_source_gets_one_clear_line(tiny_hf, tmp_path, breakage, expected):
    src = _broken_copy(tiny_hf, tmp_path)
    breakage(src)
    result = run("convert", "--model", "tiny", "--hf-path", str(src), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert expected in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_corrupt_shard_leaves_no_model_behind(tiny_hf, tmp_path):
    src = _broken_copy(tiny_hf, tmp_path)
    shard = src / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    out = tmp_path / "out"
    result = run("convert", "--model", "tiny", "--hf-path", str(src), "--out", str(out))
    assert result.exit_code != 0
    assert not out.exists()


def test_unknown_preset_and_bad_flags(tmp_path):
    result = run("generate", "x.jpg", "--model", "13b-2bit")
    assert result.exit_code != 0
    result = run("convert", "--model", "no-such-model")
    assert result.exit_code == 1 and "no-such-model" in result.output
    result = run("convert", "--model", "tiny-4bit", "--group-size", "48", "--out", str(tmp_path / "o"))
    assert result.exit_code == 1 and "group-size" in result.output
