"""The offline tiny checkpoint: real layout, consistent tokenizer, deterministic."""

import hashlib
import json

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer

from mlx_cultvlm.tiny import QWEN_OTHER_ADDED_TOKENS, QWEN_SPECIAL_TOKENS, TinySpec, build_tiny_qwen


def _digests(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, tiny_hf):
    again = build_tiny_qwen(tmp_path / "again")
    assert _digests(again) == _digests(tiny_hf)
    other = build_tiny_qwen(tmp_path / "other", TinySpec(seed=1))
    d_other, d_tiny = _digests(other), _digests(tiny_hf)
    assert d_other["tokenizer.json"] == d_tiny["tokenizer.json"]
    assert d_other["model-00001-of-00003.safetensors"] != d_tiny["model-00001-of-00003.safetensors"]


def test_config_is_flat_like_the_hub_repos(tiny_hf):
    config = json.loads((tiny_hf / "config.json").read_text())
    assert "text_config" not in config and "rope_parameters" not in config
    assert config["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert 2 * sum(config["rope_scaling"]["mrope_section"]) == head_dim
    vision = config["vision_config"]
    assert vision["model_type"] == "qwen2_5_vl"
    assert vision["spatial_merge_size"] == 2 and vision["temporal_patch_size"] == 2
    assert 0 < len(vision["fullatt_block_indexes"]) < vision["depth"]  # window + full attention


def test_special_tokens_are_consecutive_and_match_config(tiny_hf):
    tok = Tokenizer.from_file(str(tiny_hf / "tokenizer.json"))
    config = json.loads((tiny_hf / "config.json").read_text())
    added = QWEN_SPECIAL_TOKENS + QWEN_OTHER_ADDED_TOKENS
    ids = [tok.token_to_id(t) for t in added]
    assert ids == list(range(ids[0], ids[0] + len(added)))  # same order as Qwen's 151643...
    assert config["image_token_id"] == tok.token_to_id("<|image_pad|>")
    assert config["video_token_id"] == tok.token_to_id("<|video_pad|>")
    assert config["vision_start_token_id"] == tok.token_to_id("<|vision_start|>")
    assert config["eos_token_id"] == tok.token_to_id("<|im_end|>")
    assert tok.get_vocab_size() <= config["vocab_size"]
    # Special tokens are single ids even inside text.
    enc = tok.encode("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>")
    assert tok.token_to_id("<|image_pad|>") in enc.ids and tok.token_to_id("<|im_start|>") == enc.ids[0]


def test_tokenizer_round_trips_russian_and_english(tiny_hf):
    tok = Tokenizer.from_file(str(tiny_hf / "tokenizer.json"))
    for text in ["Это Чебурашка и Крокодил Гена.", "Who is this? Ёжик в тумане, 1975!", "ẞ 😀 数"]:
        assert tok.decode(tok.encode(text).ids) == text
    # Learned merges: a frequent Russian word is far fewer tokens than its UTF-8 bytes.
    assert len(tok.encode("Чебурашка").ids) <= 3


def test_shards_and_index_agree(tiny_hf):
    from safetensors import safe_open

    index = json.loads((tiny_hf / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3
    seen = {}
    for shard in shards:
        with safe_open(str(tiny_hf / shard), framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                seen[key] = shard
    assert seen == index["weight_map"]
    assert "visual.blocks.1.attn.qkv.weight" in seen and "model.layers.0.self_attn.q_proj.bias" in seen
    assert "lm_head.weight" in seen  # untied, as in 7B


def test_chat_template_renders_qwen_format(tiny_hf):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_hf))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Кто это?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Чебурашка."}]}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Кто это?<|im_end|>\n"
                    "<|im_start|>assistant\nЧебурашка.<|im_end|>\n")


def _cut_down(size="3b"):
    """The real config of `size` with every width cut, vocabulary and token ids kept."""
    from mlx_cultvlm.models import real_config

    config = real_config(size)
    config.update(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                  num_hidden_layers=2)
    config["rope_scaling"]["mrope_section"] = [2, 3, 3]
    config["vision_config"].update(depth=2, hidden_size=64, num_heads=4, intermediate_size=128,
                                   out_hidden_size=64, fullatt_block_indexes=[1])
    return config


def test_full_size_writer_has_the_hub_layout_on_a_cut_down_config(tmp_path):
    from safetensors import safe_open

    from mlx_cultvlm.tiny import build_checkpoint

    config = _cut_down("7b")
    out = build_checkpoint(tmp_path / "hf", config, shard_bytes=8_000_000)
    assert json.loads((out / "config.json").read_text()) == config
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == 151665  # Qwen2.5's tokenizer: 151,643 + 22 added tokens
    ids = [tok.token_to_id(t) for t in QWEN_SPECIAL_TOKENS + QWEN_OTHER_ADDED_TOKENS]
    assert ids == list(range(151643, 151665))
    assert tok.token_to_id("<|image_pad|>") == config["image_token_id"] == 151655
    assert tok.decode(tok.encode("Это Чебурашка?").ids) == "Это Чебурашка?"

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert len(shards) > 1
    seen, total = {}, 0
    for shard in shards:
        with safe_open(str(out / shard), framework="numpy") as f:
            for key in f.keys():
                seen[key] = shard
                total += 2 * int(np.prod(f.get_slice(key).get_shape()))
                assert f.get_slice(key).get_dtype() == "BF16"
        values = mx.load(str(out / shard))
        for key, array in values.items():
            assert array.dtype == mx.bfloat16
            mean, std = mx.mean(array.astype(mx.float32)).item(), mx.std(array.astype(mx.float32)).item()
            if key.endswith("norm.weight") or key.endswith("ln_q.weight"):
                assert 0.9 < mean < 1.1  # norm scales near 1
            elif array.size > 1000:
                assert abs(mean) < 0.002 and 0.018 < std < 0.022  # N(0, 0.02), as initializer_range
    assert seen == index["weight_map"] and index["metadata"]["total_size"] == total
    assert "lm_head.weight" in seen  # 7B unties its embeddings
    assert seen["model.embed_tokens.weight"] != seen["visual.patch_embed.proj.weight"]


def test_real_sizes_shard_like_the_hub():
    from mlx_cultvlm.models import real_config
    from mlx_cultvlm.plan import Arch
    from mlx_cultvlm.tiny import hub_shards

    for size, n_shards, params in (("3b", 2, 3_754_622_976), ("7b", 5, 8_292_166_656)):
        config = real_config(size)
        shards = hub_shards(config)
        assert len(shards) == n_shards
        assert sum(int(np.prod(shape)) for shard in shards for _, shape in shard) == params
        assert Arch.from_config(config).params() == params
        names = {name for shard in shards for name, _ in shard}
        assert ("lm_head.weight" in names) == (size == "7b")


def test_cut_down_checkpoint_converts_loads_and_answers(tmp_path):
    """The real vocabulary and token ids through convert (4-bit), stock mlx_vlm.load and generate."""
    import mlx_vlm
    from click.testing import CliRunner

    from mlx_cultvlm.cli import main
    from mlx_cultvlm.tiny import build_checkpoint
    from synthetic import draw

    hf = build_checkpoint(tmp_path / "hf", _cut_down("3b"), shard_bytes=8_000_000)
    out = tmp_path / "mlx"
    result = CliRunner().invoke(main, ["convert", "--model", "3b-4bit", "--hf-path", str(hf), "--out", str(out)])
    assert result.exit_code == 0, result.output
    model, processor = mlx_vlm.load(str(out))
    assert model.language_model.model.embed_tokens.weight.shape[0] == 151936
    image = tmp_path / "a.png"
    draw("circle", (200, 40, 40), (250, 250, 250), np.random.default_rng(0)).save(image)
    result = CliRunner().invoke(main, ["generate", str(image), "--model", str(out), "--max-tokens", "3"])
    assert result.exit_code == 0, result.output
