"""The offline tiny checkpoint: real layout, consistent tokenizer, deterministic."""

import hashlib
import json

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
