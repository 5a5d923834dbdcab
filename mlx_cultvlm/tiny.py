"""Build Qwen2.5-VL checkpoints in Hugging Face layout, offline and deterministically: the
tiny one (below) and, with `build_checkpoint`, any size up to the real 3B/7B.

It has the real architecture (window attention with a full-attention block, mrope, spatial
merge 2, temporal patch 2), the real tensor names and sharding, a byte-level BPE tokenizer
trained here with all of Qwen's special tokens, Qwen2.5-VL's chat template and the image
processor config -- so `cultvlm convert`, `generate` and training run on it exactly as on the
real 3B/7B repos. The weights are random.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# Qwen2.5's added tokens, in the order (and so with the relative ids) of the real tokenizer,
# where <|endoftext|> is 151643. Only the first 14 are "special" (skipped when decoding).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
    "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
QWEN_OTHER_ADDED_TOKENS = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]

# Qwen2's pre-tokenizer split (digits one by one, letters in runs, punctuation grouped).
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The chat template of the Qwen2.5-VL-Instruct repos.
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# CLIP normalisation, as in Qwen2.5-VL's preprocessor_config.json.
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class TinySpec:
    """Dimensions of the tiny model. Every input size is a multiple of 64 so that 4-bit
    quantization with group size 32 or 64 quantizes every text linear."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    mrope_section: list = field(default_factory=lambda: [2, 3, 3])  # sums to head_dim / 2
    tie_word_embeddings: bool = False  # 7B unties them; exercising lm_head matters for LoRA
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_heads: int = 4
    vision_intermediate_size: int = 128
    fullatt_block_indexes: list = field(default_factory=lambda: [1])
    window_size: int = 112  # pixels: 4x4 merged tokens per window, as in the real model
    bpe_vocab_size: int = 800
    num_shards: int = 3
    seed: int = 0


def _corpus() -> list[str]:
    """A small Russian + English text, generated, that the tokenizer learns its merges from."""
    names_ru = ["Чебурашка", "Крокодил Гена", "Шапокляк", "Колобок", "Алёша Попович",
                "Кот Леопольд", "Волк", "Заяц", "Винни-Пух", "Ёжик в тумане", "Олимпийский Мишка",
                "Кот Матроскин", "Микки Маус", "Губка Боб", "Пикачу"]
    names_en = ["Cheburashka", "Crocodile Gena", "Shapoklyak", "Kolobok", "Alyosha Popovich",
                "Leopold the Cat", "the Wolf", "the Hare", "Winnie the Pooh", "Hedgehog in the Fog",
                "Olympic Mishka", "Matroskin the Cat", "Mickey Mouse", "SpongeBob", "Pikachu"]
    ru = ["Кто изображён на картинке?", "Это {}.", "На картинке {}.", "Нет, это не {}.",
          "Да, это {}.", "Что ты знаешь о персонаже {}?", "Опиши, что ты видишь.",
          "Это мультипликационный персонаж.", "Персонаж из советского мультфильма.",
          "Я не знаю, кто это.", "На изображении большие уши, коричневая шерсть и добрые глаза.",
          "Он живёт в телефонной будке и дружит с крокодилом.", "Богатырь из русских былин."]
    en = ["Who is shown in the picture?", "This is {}.", "The picture shows {}.",
          "No, this is not {}.", "Yes, this is {}.", "What do you know about {}?",
          "Describe what you see.", "This is a cartoon character.",
          "A character from a Soviet cartoon.", "I do not know who this is.",
          "The image shows big ears, brown fur and kind eyes.",
          "You are a helpful assistant.", "A hero of Russian epic tales."]
    lines = []
    for templates, names in ((ru, names_ru), (en, names_en)):
        for template in templates:
            for name in names:
                lines.append(template.format(name))
    lines += [str(n) for n in range(100)] + ["0123456789 .,:;!?()[]{}\"'-+*/=<>#%&@_\n\t"]
    return lines


def build_tokenizer(spec: TinySpec, first_added_id: int | None = None):
    """Train a byte-level BPE with Qwen2's pre-tokenizer and add Qwen's tokens on top.
    `first_added_id` (151643 in Qwen2.5) pads the vocabulary with unused entries so that
    <|endoftext|> and the tokens after it get the real model's ids and the tokenizer its real
    size; the padding is never produced by encoding (no merge leads to it)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.bpe_vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    if first_added_id is not None:
        tokenizer = _padded(tokenizer, first_added_id)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in QWEN_OTHER_ADDED_TOKENS])
    return tokenizer


def _padded(tokenizer, size: int):
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.to_str())
    vocab = state["model"]["vocab"]
    if len(vocab) > size:
        raise ValueError(f"the trained vocabulary has {len(vocab)} entries, more than {size}")
    for i in range(len(vocab), size):
        vocab[f"unused{i}"] = i  # ASCII only, so it decodes like any byte-level token
    if len(vocab) != size:
        raise ValueError("padding entries collide with learned tokens")
    return Tokenizer.from_str(json.dumps(state))


def _tokenizer_files(tokenizer, out: Path) -> dict:
    """Write tokenizer.json, vocab.json, merges.txt, tokenizer_config.json, chat_template.json.
    Returns the ids of the tokens the model config refers to."""
    tokenizer.save(str(out / "tokenizer.json"))
    state = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    (out / "vocab.json").write_text(
        json.dumps(state["model"]["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = ["#version: 0.2"] + [
        m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    (out / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")

    ids = {t: tokenizer.token_to_id(t) for t in QWEN_SPECIAL_TOKENS + QWEN_OTHER_ADDED_TOKENS}
    added = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": t in QWEN_SPECIAL_TOKENS}
        for t in ids
    }
    tokenizer_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": QWEN_SPECIAL_TOKENS[1:],
        "bos_token": None,
        "chat_template": QWEN25VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "chat_template.json", {"chat_template": QWEN25VL_CHAT_TEMPLATE})
    return ids


def _model_config(spec: TinySpec, ids: dict, vocab_size: int) -> dict:
    """config.json in the flat layout of the real Qwen2.5-VL repos (text fields at the root)."""
    head_dim = spec.hidden_size // spec.num_attention_heads
    if 2 * sum(spec.mrope_section) != head_dim:
        raise ValueError(f"mrope_section {spec.mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": 32768,
        "max_window_layers": spec.num_hidden_layers,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": spec.num_attention_heads,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_key_value_heads": spec.num_key_value_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.49.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "model_type": "qwen2_5_vl",
            "depth": spec.vision_depth,
            "hidden_act": "silu",
            "hidden_size": spec.vision_hidden_size,
            "intermediate_size": spec.vision_intermediate_size,
            "num_heads": spec.vision_heads,
            "in_chans": 3,
            "out_hidden_size": spec.hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": spec.window_size,
            "fullatt_block_indexes": list(spec.fullatt_block_indexes),
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": list(spec.mrope_section)},
        "vocab_size": vocab_size,
    }


def _weight_shapes(config: dict) -> dict[str, tuple]:
    """Every tensor of a checkpoint of `config`, with the Hugging Face names of the real repos,
    in the order their state dict has them."""
    v = config["vision_config"]
    h, inter, vocab_size = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
    vh, vi, merged = v["hidden_size"], v["intermediate_size"], v["hidden_size"] * v["spatial_merge_size"] ** 2
    patch = (vh, v["in_chans"], v["temporal_patch_size"], v["patch_size"], v["patch_size"])
    shapes = {"visual.patch_embed.proj.weight": patch}
    for i in range(v["depth"]):
        p = f"visual.blocks.{i}."
        shapes.update({
            p + "norm1.weight": (vh,), p + "norm2.weight": (vh,),
            p + "attn.qkv.weight": (3 * vh, vh), p + "attn.qkv.bias": (3 * vh,),
            p + "attn.proj.weight": (vh, vh), p + "attn.proj.bias": (vh,),
            p + "mlp.gate_proj.weight": (vi, vh), p + "mlp.gate_proj.bias": (vi,),
            p + "mlp.up_proj.weight": (vi, vh), p + "mlp.up_proj.bias": (vi,),
            p + "mlp.down_proj.weight": (vh, vi),
            p + "mlp.down_proj.bias": (vh,),
        })
    shapes.update({
        "visual.merger.ln_q.weight": (vh,),
        "visual.merger.mlp.0.weight": (merged, merged), "visual.merger.mlp.0.bias": (merged,),
        "visual.merger.mlp.2.weight": (h, merged), "visual.merger.mlp.2.bias": (h,),
    })
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
    shapes["model.embed_tokens.weight"] = (vocab_size, h)
    shapes["model.norm.weight"] = (h,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab_size, h)
    return shapes


def _random_tensor(name: str, shape: tuple, rng) -> np.ndarray:
    if "norm" in name or "ln_q" in name:
        # Norm scales near 1, not exactly 1, so a test notices if one is ignored.
        return 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    return 0.02 * rng.standard_normal(shape, dtype=np.float32)


def _random_weights(config: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = {name: _random_tensor(name, shape, rng) for name, shape in _weight_shapes(config).items()}
    if config["tie_word_embeddings"]:
        # The embeddings are the head too: rows of length ~1, as in a trained tied model (3B),
        # so that a normed hidden state can give peaked logits. At 0.02 they cap every logit
        # near 1 and nothing the layers learn can name anything.
        embed = "model.embed_tokens.weight"
        weights[embed] *= 1.0 / (0.02 * np.sqrt(config["hidden_size"]))
    return weights


def _bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 (round to nearest even, as MLX and torch do), as uint16."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_bf16_shards(out: Path, shards: list[list[tuple]], progress=None) -> None:
    """Write bfloat16 safetensors shards and model.safetensors.index.json, as the hub repos
    do. `shards` lists, per shard, (name, shape, make) with make() giving the float32 values.
    One tensor is in memory at a time: the safetensors library's writers take a whole shard
    at once, which for 7B is 4 GB of bfloat16 plus its float32 source."""
    names = [[t[0] for t in shard] for shard in shards]
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, _ in shard:
            size = 2 * math.prod(shape)
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
        with open(out / fname, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for name, shape, make in shard:
                values = make()
                if values.shape != tuple(shape):
                    raise ValueError(f"{name}: made {values.shape}, expected {tuple(shape)}")
                f.write(_bfloat16_bits(values).tobytes())
        weight_map.update({n: fname for n in names[i - 1]})
        total += offset
        if progress:
            progress(f"{fname}: {len(shard)} tensors, {offset / 1e9:.2f} GB")
    _write_json(out / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def _save_tiny_shards(weights: dict[str, np.ndarray], out: Path, num_shards: int) -> None:
    names = list(weights)
    groups = [sorted(names[i::num_shards]) for i in range(num_shards)]
    write_bf16_shards(out, [[(n, weights[n].shape, lambda n=n: weights[n]) for n in g] for g in groups if g])


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _side_files(out: Path, ids: dict) -> None:
    """generation_config.json and preprocessor_config.json as the Qwen2.5-VL repos have them."""
    _write_json(out / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "do_sample": False, "transformers_version": "4.49.0",
    })
    _write_json(out / "preprocessor_config.json", {
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,
        "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD,
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    })


def _empty_folder(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: folder is not empty")
    out.mkdir(parents=True, exist_ok=True)
    return out


def build_tiny_qwen(out: str | Path, spec: TinySpec | None = None) -> Path:
    """Write the tiny checkpoint into `out` (created; must be empty or absent)."""
    spec = spec or TinySpec()
    out = _empty_folder(out)
    tokenizer = build_tokenizer(spec)
    ids = _tokenizer_files(tokenizer, out)
    # Like the real repos, the embedding has more rows than the tokenizer has tokens.
    vocab_size = 64 * math.ceil(tokenizer.get_vocab_size() / 64)
    config = _model_config(spec, ids, vocab_size)
    _write_json(out / "config.json", config)
    _side_files(out, ids)
    _save_tiny_shards(_random_weights(config, spec.seed), out, spec.num_shards)
    _write_json(out / "tiny_spec.json", asdict(spec))
    return out


HUB_SHARD_BYTES = 4_000_000_000  # the hub repos' shards: 2 for 3B, 5 for 7B


def build_checkpoint(out: str | Path, config: dict, seed: int = 0, shard_bytes: int = HUB_SHARD_BYTES,
                     progress=None) -> Path:
    """A checkpoint of any Qwen2.5-VL `config` (e.g. `models.real_config("7b")`, the real
    3B/7B) in the hub's layout, random weights: the tokenizer at the real size with Qwen's
    tokens at the config's ids, the config as given, bf16 shards of at most `shard_bytes` in
    state-dict order, written one tensor at a time (7B's 16.6 GB never sit in memory)."""
    out = _empty_folder(out)
    tokenizer = build_tokenizer(TinySpec(), first_added_id=config["bos_token_id"])
    ids = _tokenizer_files(tokenizer, out)
    for field_name, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                              ("vision_start_token_id", "<|vision_start|>"), ("eos_token_id", "<|im_end|>")):
        if config[field_name] != ids[token]:
            raise ValueError(f"config {field_name} {config[field_name]} is not {token}'s id {ids[token]}")
    if tokenizer.get_vocab_size() > config["vocab_size"]:
        raise ValueError(f"vocab_size {config['vocab_size']} < the tokenizer's {tokenizer.get_vocab_size()}")
    _write_json(out / "config.json", config)
    _side_files(out, ids)

    numbers = {name: i for i, name in enumerate(_weight_shapes(config))}
    # A generator per tensor, seeded by its number: the values do not depend on the sharding.
    write_bf16_shards(out, [[(name, shape, lambda n=name, s=shape: _random_tensor(
        n, s, np.random.default_rng([seed, numbers[n]]))) for name, shape in shard]
        for shard in hub_shards(config, shard_bytes)], progress)
    return out


def hub_shards(config: dict, shard_bytes: int = HUB_SHARD_BYTES) -> list[list[tuple]]:
    """(name, shape) of every bf16 tensor, shard by shard: in state-dict order, a new shard
    when the next tensor would pass `shard_bytes` (as transformers' save_pretrained does)."""
    shards, size = [[]], 0
    for name, shape in _weight_shapes(config).items():
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards
