"""`cultvlm plan`: the memory a LoRA training step and inference need, predicted from the
architecture, and the largest model / pixel budget / batch that fits the memory you have.

    cultvlm plan --memory 24                       # every preset: 3b, 7b at 4bit, 8bit, bf16
    cultvlm plan --memory 24 --model 7b-4bit --rank 16 --max-pixels 200704 --batch 1

The prediction is a sum of tensor sizes, in bytes, read off the config (`Arch`) and the step
(`Step`). Nothing is allocated: the 7B prediction takes microseconds.

Peak of one training step (what `cultvlm lora` runs: vision features without gradients, then
the language model forward + backward, then clipping and the AdamW update):

    train = weights + LoRA state + max(vision, text, update)

- weights: every tensor of the model at its stored size. The language model's matrices
  (attention, MLP, embedding, lm_head) are quantized when `bits` is set and the group size
  divides their input size (as `cultvlm convert` / mlx-vlm do): bits/8 bytes a parameter plus a
  scale and a bias per group of `group_size`, stored in the float dtype. Norms, biases and the
  whole vision tower stay in the float dtype (mlx-vlm never quantizes the vision tower).
- LoRA state: rank x (in + out) parameters per adapted linear, float32 (mlx-lm creates them
  so), times 3 in the training loop (parameters + AdamW's two moments). `fresh_optimizer`
  (a single step with a new optimizer, as `scripts/bench_memory.py` measures) keeps only the
  parameters resident and creates the moments in the update.
- vision: the vision tower's forward on the batch's images: the pixel input
  (patches x 1176 float32, alive for the whole step) plus the larger of the patch-embedding
  moment (`VIS_PIXEL_COPIES` copies of the pixels in the float dtype + `VIS_EMBED_H` x P x
  vision hidden) and the full-attention moment (`VIS_ATTN_H` x P x vision hidden + the
  attention scores heads x P_image^2 of every image, `VIS_SCORES` copies). A model without a
  full-attention block has the window moment instead (`VIS_WIN_H`, `VIS_WIN_I`, window scores).
- text: what the backward pass keeps of every decoder layer, per token: `SAVED_H` x hidden +
  `SAVED_I` x intermediate values, plus `SAVED_SCORES` x heads x L^2 attention scores, times the
  number of layers -- with gradient checkpointing only `CKPT_H` x hidden per token per layer,
  plus one layer's saved set while it is recomputed. On top of that, the larger of the backward
  transient of one layer (`TRANS_H` x hidden + `TRANS_I` x intermediate per token) and the LM
  head's (`HEAD_LOGITS` float32 copies of target rows x vocab, `HEAD_LORA_LOGITS` more with
  LoRA on lm_head: the loss is computed only at assistant tokens, padded to 32 rows). Plus the
  image features (image tokens x hidden) and the pixel input.
- the vision-feature cache (resident through the run): each training image's tower output,
  image tokens x hidden in the float dtype (`cached_images`; 256 x 3584 x 2 bytes = 1.75 MiB
  for a 448-px image on 7B, 8.7 GiB for 5,000 of them).
- update: the gradients and what clipping and AdamW create from them, `UPDATE_COPIES` x the LoRA
  parameter bytes (+ `FRESH_MOMENTS` when a fresh optimizer creates its moments), plus the
  pixel input the loop still holds.

Inference (`cultvlm generate` / `eval`: mlx-vlm prefill in chunks of 2048 tokens, keeping
logits of the last token only) = weights + max(vision, KV cache + one layer's forward transient
(`INFER_H` x hidden + `INFER_I` x intermediate per token, `INFER_SCORES` x heads x L^2)).

Where the constants come from. The tensor counts are what MLX actually holds at its peak, not
what a textbook backward would keep: each is a least-squares fit (of relative error) to peaks
measured with `mx.get_peak_memory()` on MLX 0.32.4's CPU backend (mlx-vlm 0.7.10, mlx-lm 0.32.2)
with float32 activations:
- text: 90 language-model forward + backward passes of random models (hidden 128-512, head dim
  32-128, intermediate 1-5.4 x hidden, 1-4 layers, 50-738 tokens, batch 1-2, vocab 832-32768,
  4-bit, 8-bit and float weights, with and without checkpointing): rms error 7.5%, worst 22%;
  fitted on 60 of them first, the other 30 came out at rms 9%;
- vision: 57 vision-tower forwards (hidden 64-1280 including the real tower, 64-4096 patches,
  batch 1-2): rms 7%; worst 14% for towers with a full-attention block (all Qwen2.5-VL's);
- update: 8 loop steps at ranks 128 and 512; lm_head LoRA: 3 steps with a 32768 vocab;
- inference: 9 generations with 300-2500-token prompts (rms 3%).
Then checked where nothing was fitted: the 16 steps `scripts/bench_memory.py` measured on the
real 3B/7B widths (1-3 layers; within 5%), the real widths at 6 and 12 layers (3B, float
weights; within 1%) and 6 layers (7B; within 1%), and a LoRA step of the tiny and a mid-size
model through lora.py's own step code (within 6%); tests/test_plan.py holds the last two to 15%.
Peaks are MLX's active memory: its cache of freed buffers (`mx.get_cache_memory()`, reused, and
returned by `mx.clear_cache()`) is not counted, nor is the Python process itself.

Not modelled: LoRA on the vision side (`cultvlm lora --vision merger|all`), `--compile`,
gradient accumulation (it adds one more copy of the LoRA gradients), several images per sample.

Beyond what was measured (say so when you rely on it):
- bf16/fp16 activations (a Mac): the same counts at 2 bytes, except what stays float32: the
  logits, and the float32 copy of its input that each LoRA linear keeps for the backward (its A
  matrix is float32, so `x @ A` promotes x). MLX's CPU backend converts bf16 around every
  matmul, so its bf16 peaks are not a Mac's; only the per-layer saved set could be checked
  (one model: predicted 23.2 KB per token per layer, measured 21.6). An extrapolation.
- On a Mac, Metal's fused attention does not materialise the scores in a forward pass (vision
  tower, inference): there the score terms are an upper bound.
- Metal may use about 2/3-3/4 of unified memory by default (macOS's recommended working set,
  ~16 GB of a 24 GB M4 Pro). `cultvlm plan` assumes 2/3 (`--usable`), then asks the prediction
  plus `MARGIN` (the 15% the prediction is held to) to fit.

The recommendation (`recommend`): the largest model that trains on the requested pixel budget
(at batch 1, with gradient checkpointing if it needs it), else the largest that trains on a
smaller one; then as many pixels and as large a batch as fit, up to the request; checkpointing
only if needed. Less memory never recommends a larger model, nor more pixels or a larger batch
for the same model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Annotated

import click
from pydantic import Field

from .errors import CultvlmError
from .images import DEFAULT_MAX_PIXELS, FACTOR, QWEN_MAX_PIXELS
from .settings import Count, NonNegativeCount, Positive, Share, checked, settings_class

GB = 1024**3  # memory sizes are binary, as Apple's "24 GB" is
PIXEL_VALUES = 3 * 2 * 14 * 14  # floats per patch handed to the vision tower (channels x temporal x 14 x 14)
TEXT_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Tensor counts at the peak (see the module docstring). Units: copies of (tokens x width) in
# the activation dtype, or of the named tensor.
SAVED_H, SAVED_I, SAVED_SCORES = 7.59, 4.34, 1.73  # kept per decoder layer for the backward
CKPT_H = 4.93  # kept per decoder layer with gradient checkpointing
TRANS_H, TRANS_I, TRANS_SCORES = 6.97, 10.39, 0.67  # one decoder layer's backward transient
HEAD_LOGITS = 4.44  # float32 copies of (target rows x vocab) in the loss and its backward
HEAD_LORA_LOGITS = 2.0  # more of them with LoRA on lm_head (its low-rank path and its gradient)
VIS_PIXEL_COPIES, VIS_EMBED_H = 1.92, 7.86  # patch-embedding moment
VIS_ATTN_H, VIS_SCORES = 24.79, 1.04  # full-attention moment
VIS_WIN_H, VIS_WIN_I = 14.8, 1.49  # window-attention moment (towers without a full block)
VIS_WINDOW = 64  # patches per attention window (112 px windows of 14 px patches)
UPDATE_COPIES = 2.0  # LoRA-parameter-sized float32 tensors alive in the update (gradients, clip, AdamW)
FRESH_MOMENTS = 2.0  # + the two AdamW moments a fresh optimizer creates in its first update
INFER_H, INFER_I, INFER_SCORES = 5.85, 3.52, 1.21  # one layer's forward transient in a prefill chunk
FIXED = 243_000  # small arrays: position ids, masks, rope tables, ... (bytes)
# A compiled training step pads target rows and sequences to multiples of 32 (lora.COMPILED_PAD);
# the default, uncompiled one pads to the longest sample only: these make the plan an upper bound.
LOSS_ROWS_BUCKET = 32
SEQ_BUCKET = 32
KV_STEP = 256  # mlx-lm's KV cache grows in steps of this many tokens
PREFILL_CHUNK = 2048  # mlx-vlm's prefill step

USABLE = 2 / 3  # share of unified memory Metal gets by default (macOS: ~2/3 to 3/4)
MARGIN = 0.15  # the prediction's validated error bound, kept free


@dataclass(frozen=True)
class Arch:
    """The fields of a Qwen2.5-VL config.json that size the model."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    v_depth: int
    v_hidden: int
    v_heads: int
    v_intermediate: int
    v_full_blocks: int  # full-attention blocks (the rest use 112-pixel windows)
    v_out: int

    @classmethod
    def from_config(cls, config: dict) -> Arch:
        try:
            v = config["vision_config"]
            arch = cls(
                hidden=int(config["hidden_size"]), layers=int(config["num_hidden_layers"]),
                heads=int(config["num_attention_heads"]),
                kv_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
                intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
                tied=bool(config.get("tie_word_embeddings", False)),
                v_depth=int(v["depth"]), v_hidden=int(v["hidden_size"]), v_heads=int(v["num_heads"]),
                v_intermediate=int(v["intermediate_size"]),
                v_full_blocks=len([i for i in v.get("fullatt_block_indexes", []) if 0 <= i < int(v["depth"])]),
                v_out=int(v.get("out_hidden_size") or config["hidden_size"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CultvlmError(f"model config: missing or bad field {e} (not a Qwen2.5-VL config?)") from None
        if min(arch.hidden, arch.layers, arch.heads, arch.kv_heads, arch.intermediate, arch.vocab,
               arch.v_depth, arch.v_hidden, arch.v_heads, arch.v_intermediate) <= 0:
            raise CultvlmError("model config: sizes must be positive")
        return arch

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def text_matrices(self) -> dict[str, tuple[int, int, int]]:
        """name -> (in, out, how many) of the language model's quantizable matrices."""
        h, kv, i, n = self.hidden, self.kv_dim, self.intermediate, self.layers
        mats = {"q_proj": (h, h, n), "k_proj": (h, kv, n), "v_proj": (h, kv, n), "o_proj": (h, h, n),
                "gate_proj": (h, i, n), "up_proj": (h, i, n), "down_proj": (i, h, n),
                "embed_tokens": (h, self.vocab, 1)}
        if not self.tied:
            mats["lm_head"] = (h, self.vocab, 1)
        return mats

    def text_other_params(self) -> int:
        """Norm weights and the q/k/v biases."""
        return self.layers * (2 * self.hidden + self.hidden + 2 * self.kv_dim) + self.hidden

    def vision_params(self) -> int:
        vh, vi, merged = self.v_hidden, self.v_intermediate, 4 * self.v_hidden
        block = 2 * vh + (3 * vh * vh + 3 * vh) + (vh * vh + vh) + 2 * (vh * vi + vi) + (vi * vh + vh)
        merger = vh + (merged * merged + merged) + (merged * self.v_out + self.v_out)
        return vh * PIXEL_VALUES + self.v_depth * block + merger

    def params(self) -> int:
        return (sum(a * b * n for a, b, n in self.text_matrices().values()) + self.text_other_params()
                + self.vision_params())


@dataclass(frozen=True)
class Step:
    """One training step (or one generation) as `cultvlm lora` / `generate` run it."""

    bits: int | None = 4  # None: the language model in the float dtype
    group_size: int = 64
    float_bytes: int = 2  # bf16 weights, scales and activations (4: float32, as bench_memory.py runs)
    rank: int = 16
    targets: tuple = TEXT_LINEARS  # + "lm_head" (untied models only)
    batch: int = 1
    image_tokens: int = 256  # per sample, one image each (448x448 -> 256); 0: text only
    text_tokens: int = 64  # per sample: system prompt, question, answer, chat markup
    target_tokens: int = 32  # per sample: assistant tokens carrying loss
    seq_len: int | None = None  # padded sequence length; default: tokens rounded up to SEQ_BUCKET
    grad_checkpoint: bool = False
    fresh_optimizer: bool = False  # one step with a new AdamW (bench_memory.py), not the loop
    answer_tokens: int = 128  # inference: tokens generated after the prompt
    cached_images: int = 0  # training: images whose vision features the loop keeps (lora.FeatureCache)

    @property
    def seq(self) -> int:
        if self.seq_len is not None:
            return self.seq_len
        tokens = self.text_tokens + (self.image_tokens + 2 if self.image_tokens else 0)  # + vision start/end
        return -(-tokens // SEQ_BUCKET) * SEQ_BUCKET


@dataclass
class Breakdown:
    """Predicted bytes: the resident parts, the competing step moments, and the peak."""

    weights: int
    lora: int  # LoRA parameters (+ AdamW moments in the loop)
    vision: int
    text: int
    update: int
    total: int = 0
    parts: dict = field(default_factory=dict)

    @property
    def moment(self) -> str:
        return max(("vision", self.vision), ("text", self.text), ("update", self.update), key=lambda kv: kv[1])[0]


def weight_bytes(arch: Arch, bits: int | None, group_size: int, float_bytes: int) -> int:
    total = 0
    for fan_in, fan_out, n in arch.text_matrices().values():
        size = fan_in * fan_out * n
        if bits and fan_in % group_size == 0:
            total += size * bits // 8 + 2 * (size // group_size) * float_bytes  # packed + scales + biases
        else:
            total += size * float_bytes
    return total + (arch.text_other_params() + arch.vision_params()) * float_bytes


def lora_params(arch: Arch, rank: int, targets=TEXT_LINEARS) -> int:
    mats = arch.text_matrices()
    total = 0
    for name in targets:
        if name not in mats or name == "embed_tokens":
            if name == "lm_head" and arch.tied:
                raise CultvlmError("target lm_head: this model ties lm_head to the embeddings; drop it from targets")
            raise CultvlmError(f"LoRA target {name!r}: not a linear of the language model "
                               f"(one of {', '.join(TEXT_LINEARS)}, lm_head)")
        fan_in, fan_out, n = mats[name]
        total += rank * (fan_in + fan_out) * n
    return total


def image_patches(image_tokens: int) -> int:
    return 4 * image_tokens  # 2x2 patches merge into one token


def vision_bytes(arch: Arch, step: Step) -> int:
    """The vision tower's forward on the batch's images (features without gradients)."""
    if not step.image_tokens:
        return 0
    b = step.float_bytes
    p_img = image_patches(step.image_tokens)
    P = step.batch * p_img
    pixels = P * PIXEL_VALUES * 4
    embed = VIS_PIXEL_COPIES * P * PIXEL_VALUES * b + VIS_EMBED_H * P * arch.v_hidden * b
    if arch.v_full_blocks:
        scores = step.batch * arch.v_heads * p_img * p_img * b
        attn = VIS_ATTN_H * P * arch.v_hidden * b + VIS_SCORES * scores
    else:
        attn = (VIS_WIN_H * P * arch.v_hidden * b + VIS_WIN_I * P * arch.v_intermediate * b
                + VIS_SCORES * arch.v_heads * P * VIS_WINDOW * b)
    return int(pixels + max(embed, attn))


def text_bytes(arch: Arch, step: Step) -> tuple[int, dict]:
    """The language model's forward + backward (LoRA gradients) on one batch."""
    b, B, L = step.float_bytes, step.batch, step.seq
    N = B * L
    h, i = arch.hidden, arch.intermediate
    scores = B * arch.heads * L * L * b
    lora_inputs = 0
    if b < 4:  # each adapted linear keeps a float32 copy of its input (its A is float32)
        widths = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": h, "gate_proj": h, "up_proj": h,
                  "down_proj": i}
        lora_inputs = N * 4 * sum(widths.get(t, 0) for t in step.targets)
    saved = SAVED_H * N * h * b + SAVED_I * N * i * b + SAVED_SCORES * scores + lora_inputs
    transient = TRANS_H * N * h * b + TRANS_I * N * i * b + TRANS_SCORES * scores
    rows = -(-B * step.target_tokens // LOSS_ROWS_BUCKET) * LOSS_ROWS_BUCKET
    head = HEAD_LOGITS * rows * arch.vocab * 4
    if "lm_head" in step.targets:
        head += HEAD_LORA_LOGITS * rows * arch.vocab * 4
    if step.grad_checkpoint:
        kept = arch.layers * CKPT_H * N * h * b
        top = max(head, saved + transient)
    else:
        kept = arch.layers * saved
        top = max(head, transient)
    inputs = B * image_patches(step.image_tokens) * PIXEL_VALUES * 4 + B * step.image_tokens * arch.v_out * b
    parts = {"saved_per_layer": saved, "kept": kept, "layer_transient": transient, "head": head,
             "inputs": inputs}
    return int(kept + top + inputs), parts


def predict_training(arch: Arch, step: Step) -> Breakdown:
    """Peak bytes of one LoRA training step (see the module docstring for the formula)."""
    _check_step(step)
    weights = weight_bytes(arch, step.bits, step.group_size, step.float_bytes)
    n = lora_params(arch, step.rank, step.targets)
    lora = 4 * n * (1 if step.fresh_optimizer else 3)
    vision = vision_bytes(arch, step)
    text, parts = text_bytes(arch, step)
    pixels = step.batch * image_patches(step.image_tokens) * PIXEL_VALUES * 4  # the step's inputs, still held
    update = int(4 * n * (UPDATE_COPIES + (FRESH_MOMENTS if step.fresh_optimizer else 0)) + pixels)
    cache = feature_cache_bytes(arch, step)
    total = weights + lora + cache + max(vision, text, update) + FIXED
    return Breakdown(weights, lora, vision, text, update, total, parts | {"lora_params": n, "feature_cache": cache})


def feature_cache_bytes(arch: Arch, step: Step) -> int:
    """The frozen tower's output kept for every training image (image tokens x the language
    model's width, in the float dtype): with thousands of images, as much as the weights."""
    return step.cached_images * step.image_tokens * arch.v_out * step.float_bytes


def predict_inference(arch: Arch, step: Step) -> Breakdown:
    """Peak bytes of answering about one image (batch 1) with mlx-vlm's generate."""
    _check_step(step)
    b = step.float_bytes
    one = replace(step, batch=1)
    weights = weight_bytes(arch, step.bits, step.group_size, step.float_bytes)
    vision = vision_bytes(arch, one)
    L = one.seq

    def kv(tokens):  # keys and values of every layer, grown in steps of KV_STEP tokens
        return arch.layers * 2 * (-(-tokens // KV_STEP) * KV_STEP) * arch.kv_dim * b

    # The prompt goes through in chunks of PREFILL_CHUNK (all but its last token), then one token
    # at a time; each chunk attends to everything before it.
    moments, done = [], 0
    while L - 1 - done > 0:
        c = min(PREFILL_CHUNK, L - 1 - done)
        moments.append(kv(done + c) + INFER_H * c * arch.hidden * b + INFER_I * c * arch.intermediate * b
                       + INFER_SCORES * arch.heads * c * (done + c) * b)
        done += c
    moments.append(kv(L + step.answer_tokens) + arch.vocab * 4 * 2)
    kv_total = kv(L + step.answer_tokens)
    text = int(max(moments) + L * arch.hidden * b + one.image_tokens * arch.v_out * b)
    total = weights + max(vision, text) + FIXED
    return Breakdown(weights, 0, vision, text, 0, total, {"kv_cache": kv_total})


def _check_step(step: Step) -> None:
    if step.bits not in (None, 2, 3, 4, 5, 6, 8):
        raise CultvlmError(f"bits must be 2, 3, 4, 5, 6, 8 or none, got {step.bits}")
    if step.float_bytes not in (2, 4):
        raise CultvlmError(f"float_bytes must be 2 (bf16/fp16) or 4 (float32), got {step.float_bytes}")
    for name in ("rank", "batch", "group_size", "text_tokens"):
        if getattr(step, name) <= 0:
            raise CultvlmError(f"{name.replace('_', '-')} must be positive, got {getattr(step, name)}")
    if step.image_tokens < 0 or step.target_tokens < 0 or step.answer_tokens < 0:
        raise CultvlmError("token counts must not be negative")


# ---------------------------------------------------------------- presets and the command

PLAN_MODELS = ("7b", "7b-8bit", "7b-4bit", "3b", "3b-8bit", "3b-4bit")  # largest first


def preset_arch(name: str) -> tuple[Arch, int | None]:
    """(architecture, bits) of a 3b/7b preset."""
    from .models import PRESETS, real_config

    if name not in PLAN_MODELS:
        known = ", ".join(PLAN_MODELS)
        if name in PRESETS:
            raise CultvlmError(f"model {name!r}: plan knows the Qwen2.5-VL presets {known}; "
                               "the tiny model needs no planning")
        raise CultvlmError(f"unknown model {name!r}: plan knows {known}")
    return Arch.from_config(real_config(name.split("-")[0])), PRESETS[name].bits


def tokens_for_pixels(max_pixels: int) -> int:
    """Image tokens of the largest image the pixel budget admits (any aspect ratio)."""
    return max_pixels // (FACTOR * FACTOR)


def pixel_budgets(up_to: int) -> list[int]:
    """Square budgets from 224² up, in 112-pixel steps, and `up_to` itself."""
    sides = range(224, int(math.isqrt(QWEN_MAX_PIXELS)) + 1, 112)
    return sorted({s * s for s in sides if s * s <= up_to} | {up_to})


def fits(predicted: int, usable_bytes: float) -> bool:
    return predicted * (1 + MARGIN) <= usable_bytes


@dataclass
class Choice:
    model: str
    max_pixels: int
    batch: int
    grad_checkpoint: bool
    peak: int
    pixels_headroom: int  # the largest pixel budget that would fit at this batch
    batch_headroom: int  # the largest batch (up to MAX_BATCH) that would fit at these pixels
    feature_cache: bool = True


MAX_BATCH = 64


def recommend(memory_gb: float, models=PLAN_MODELS, rank: int = 16, max_pixels: int = DEFAULT_MAX_PIXELS,
              batch: int = 1, grad_checkpoint: bool | None = None, text_tokens: int = 64,
              usable: float = USABLE, images: int = 0) -> Choice | None:
    """What to train with `memory_gb`, in this order of priority:

    1. model: the first (largest) of `models` that trains on the requested pixel budget at
       batch 1 (with gradient checkpointing if need be); if none can, the first that trains at
       some smaller budget (224² and up, in 112-pixel steps);
    2. pixels: the requested budget, or the largest smaller one that fits that model;
    3. batch: the largest up to the requested one that fits;
    4. gradient checkpointing only if that batch needs it (`grad_checkpoint` forces it on or off).

    Less memory never gives a larger model, nor (for the same model) more pixels, nor (for the
    same model and pixels) a larger batch. None if nothing fits."""
    budget = memory_gb * GB * usable
    # How a step saves memory, cheapest first: gradient checkpointing recomputes each layer,
    # and without the feature cache the frozen tower runs on every image again each epoch; both
    # cost time, and a smaller model would cost what it knows.
    savings = [(False, True), (True, True), (False, False), (True, False)]
    if grad_checkpoint is not None:
        savings = [(c, cache) for c, cache in savings if c == grad_checkpoint]
    archs = {name: preset_arch(name) for name in models}

    def step(name, pixels, b, saving):
        ckpt, cache = saving
        return Step(bits=archs[name][1], rank=rank, batch=b, image_tokens=tokens_for_pixels(pixels),
                    text_tokens=text_tokens, grad_checkpoint=ckpt, cached_images=images if cache else 0)

    def ok(name, pixels, b, saving):
        return fits(predict_training(archs[name][0], step(name, pixels, b, saving)).total, budget)

    def trains(name, pixels, b=1):
        return any(ok(name, pixels, b, s) for s in savings)

    name = next((m for m in models if trains(m, max_pixels)), None)
    if name is None:
        name = next((m for m in models if trains(m, pixel_budgets(max_pixels)[0])), None)
        if name is None:
            return None
    pixels = max(p for p in pixel_budgets(max_pixels) if trains(name, p))
    b = max(n for n in range(1, batch + 1) if trains(name, pixels, n))
    saving = next(s for s in savings if ok(name, pixels, b, s))
    peak = predict_training(archs[name][0], step(name, pixels, b, saving)).total
    more_pixels = max([pixels] + [p for p in pixel_budgets(QWEN_MAX_PIXELS) if ok(name, p, b, saving)])
    more_batch = max(n for n in range(1, MAX_BATCH + 1) if n <= b or ok(name, pixels, n, saving))
    return Choice(name, pixels, b, saving[0], peak, more_pixels, more_batch, feature_cache=saving[1])


def _gb(n: int) -> str:
    return f"{n / GB:.1f}"


def _shape(pixels: int) -> str:
    side = math.isqrt(pixels)
    return f"{side}x{side}" if side * side == pixels else f"{pixels} pixels"


def plan_table(models, memory_gb: float, rank: int, max_pixels: int, batch: int, text_tokens: int,
               usable: float, images: int = 0) -> list[str]:
    budget = memory_gb * GB * usable
    tokens = tokens_for_pixels(max_pixels)
    lines = [f"memory {memory_gb:g} GB, of which Metal may use {budget / GB:.1f} GB (assumed {usable:.0%}); "
             f"a configuration fits if its predicted peak + {MARGIN:.0%} stays within that",
             f"LoRA rank {rank} on the 7 decoder linears; batch {batch}; one image per sample of up to "
             f"{max_pixels} pixels ({tokens} image tokens) + {text_tokens} text tokens (the longest sample sets a "
             f"step: --text-tokens); the vision features of {images} training images kept (--images); bf16; "
             "peaks in GB (2^30 bytes)",
             "",
             f"{'model':<9} {'weights':>8} {'features':>8} {'train':>8} {'train+ckpt':>11} {'inference':>10}   "
             "fits: train / +ckpt / infer"]
    for name in models:
        arch, bits = preset_arch(name)
        step = Step(bits=bits, rank=rank, batch=batch, image_tokens=tokens, text_tokens=text_tokens,
                    cached_images=images)
        plain = predict_training(arch, step)
        ckpt = predict_training(arch, replace(step, grad_checkpoint=True))
        infer = predict_inference(arch, step)
        marks = " / ".join("yes" if fits(p.total, budget) else "no" for p in (plain, ckpt, infer))
        lines.append(f"{name:<9} {_gb(plain.weights):>8} {_gb(plain.parts['feature_cache']):>8} "
                     f"{_gb(plain.total):>8} {_gb(ckpt.total):>11} {_gb(infer.total):>10}   {marks}")
    return lines


def recommendation_line(choice: Choice | None, models, memory_gb: float, usable: float, max_pixels: int,
                        batch: int) -> str:
    if choice is None:
        return (f"recommendation: nothing fits in {memory_gb:g} GB ({memory_gb * usable:.1f} GB usable), not even "
                f"{models[-1]} at 224x224, batch 1, with --grad-checkpoint")
    cut = [f"pixels cut from {max_pixels}"] if choice.max_pixels < max_pixels else []
    cut += [f"batch cut from {batch}"] if choice.batch < batch else []
    room = []
    if choice.pixels_headroom > choice.max_pixels:
        room.append(f"--max-pixels up to {choice.pixels_headroom} ({_shape(choice.pixels_headroom)})")
    if choice.batch_headroom > choice.batch:
        room.append(f"--batch-size up to {choice.batch_headroom}"
                    + ("+" if choice.batch_headroom == MAX_BATCH else ""))
    return (f"recommendation: cultvlm lora --model {choice.model} --max-pixels {choice.max_pixels} "
            f"--batch-size {choice.batch}{' --grad-checkpoint' if choice.grad_checkpoint else ''}"
            f"{'' if choice.feature_cache else ' --no-feature-cache'}"
            f" (peak {_gb(choice.peak)} GB, images up to {_shape(choice.max_pixels)}"
            + (f"; {', '.join(cut)}" if cut else "")
            + (f"; room for {' or '.join(room)}" if room else "") + ")")


@settings_class
class PlanSettings:
    """`cultvlm plan`'s flags, checked as every setting is (settings.py)."""
    memory: Positive  # GB
    rank: Count
    max_pixels: Annotated[int, Field(strict=True, ge=FACTOR * FACTOR, le=QWEN_MAX_PIXELS)]
    batch: Count
    text_tokens: Count
    images: NonNegativeCount
    usable: Share


@click.command("plan")
@click.option("--memory", type=float, required=True, help="unified memory of the machine, GB (e.g. 24)")
@click.option("--model", default=None, help=f"one preset ({', '.join(PLAN_MODELS)}); default: all of them")
@click.option("--rank", type=int, default=16, show_default=True, help="LoRA rank")
@click.option("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, show_default=True,
              help="pixel budget per image (448*448 = 256 image tokens)")
@click.option("--batch", type=int, default=1, show_default=True, help="samples per step")
@click.option("--grad-checkpoint", is_flag=True, help="recommend only configurations with gradient checkpointing")
@click.option("--text-tokens", type=int, default=64, show_default=True,
              help="text tokens per sample (prompt, answer, chat markup)")
@click.option("--images", type=int, default=1000, show_default=True,
              help="training images: lora keeps each one's vision features in memory (the feature cache)")
@click.option("--usable", type=float, default=USABLE, show_default="2/3",
              help="share of the memory the GPU may use (macOS default: about 2/3 to 3/4)")
def plan_command(memory, model, rank, max_pixels, batch, grad_checkpoint, text_tokens, images, usable):
    """Predict the memory of LoRA training and inference per model; recommend what fits."""
    checked(PlanSettings, dict(memory=memory, rank=rank, max_pixels=max_pixels, batch=batch,
                               text_tokens=text_tokens, images=images, usable=usable))
    models = PLAN_MODELS if model is None else (model,)
    for name in models:
        preset_arch(name)  # an unknown model fails before any output
    for line in plan_table(models, memory, rank, max_pixels, batch, text_tokens, usable, images):
        click.echo(line)
    choice = recommend(memory, models, rank, max_pixels, batch, True if grad_checkpoint else None,
                       text_tokens, usable, images)
    click.echo(recommendation_line(choice, models, memory, usable, max_pixels, batch))
