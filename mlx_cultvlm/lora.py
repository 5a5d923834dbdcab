"""`cultvlm lora`: the LoRA / QLoRA training loop, top to bottom.

load model -> load data -> attach LoRA -> optimizer -> loop (accumulate, clip, update,
validate, checkpoint) -> save adapters, log, loss curve and the record of the training pictures
(training_pictures.json: `eval` refuses to test on them or on near-duplicates of them).

The forward pass is written out here rather than taken from the model's __call__, so that
the loss is computed only where it is needed (assistant tokens: the LM head over every
position is most of a 3B step's time), the image features are merged without host syncs
(which lets the language-model step be compiled), and each piece can be checked in tests.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import yaml
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from pydantic import Field
from tqdm import tqdm

from .data.check import TRAINED_ON, read_training_record, training_record
from . import settings
from .errors import CultvlmError
from .files import check_out_apart, output_lock, partial_folder, remove_own, replace_folder, write_json
from .images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, check_budget
from .models import read_config, resolve_model
from .plan import GB, Arch, Step, feature_cache_bytes, predict_training  # GB: binary, as Apple's "24 GB"
from .settings import Count, Fraction, Names, NonNegative, NonNegativeCount, Positive, settings_class
from .samples import MIX_KINDS, Batch, Sample, SampleEncoder, load_split, make_batch, preprocess
from .vlm import (TEXT_LINEARS, VISION_LINEARS, attach_lora, base_identity, image_features, image_gather_index,
                  lm_head, load_model, with_image_features)


@settings_class
class LoraConfig:
    """Every field is checked (type, range, finite) when the config is made: settings.checked."""
    model: str = "7b-4bit"
    data: str = ""
    out: str = "adapters/run"
    models_dir: str | None = None
    # data
    max_pixels: Count = DEFAULT_MAX_PIXELS
    min_pixels: Count = DEFAULT_MIN_PIXELS
    max_seq_len: Count = 1024
    skip_bad_samples: bool = False
    mix: Names | None = None  # train and validate on these meta.kind values only (naming, replay, ...)
    # adapters
    rank: Count = 16
    alpha: Positive = 32.0  # scale = alpha / rank
    dropout: Fraction = 0.05
    targets: Names = field(default_factory=lambda: list(TEXT_LINEARS))  # + "lm_head" if untied
    vision: Literal["none", "merger", "all"] = "none"  # also put LoRA on the vision side
    # optimisation
    steps: Count = 200  # optimizer updates
    batch_size: Count = 1
    grad_accum: Count = 1
    learning_rate: Positive = 1e-4
    warmup_steps: NonNegativeCount = 10
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1  # cosine decays to learning_rate * this
    weight_decay: NonNegative = 0.0
    max_grad_norm: NonNegative = 1.0  # 0: no clipping
    grad_checkpoint: bool = False
    # Frozen vision tower: compute each image's features once and reuse them (False recomputes
    # them every step, to check that both give the same loss).
    feature_cache: bool = True
    compile: bool = False  # same loss, no speed-up measured on the CPU backend (docs/TRAINING.md)
    distributed: bool = False  # data-parallel over the ranks `mlx.launch` starts (docs/TRAINING.md)
    seed: NonNegativeCount = 0
    # bookkeeping
    val_every: Count = 50
    save_every: Count = 50


# Fields a resumed run may change without changing what it computes.
RESUMABLE_CHANGES = {"steps", "val_every", "save_every", "out", "models_dir"}


def load_config(yaml_path: str | None, overrides: dict) -> LoraConfig:
    """Defaults, then the YAML file, then command-line flags (those not None)."""
    values = {}
    if yaml_path:
        try:
            loaded = yaml.safe_load(Path(yaml_path).read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise CultvlmError(f"{yaml_path}: cannot read config ({e})") from None
        if not isinstance(loaded, dict):
            raise CultvlmError(f"{yaml_path}: expected a mapping of option: value")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = settings.checked(LoraConfig, values, yaml_path)
    unknown = sorted(set(cfg.mix or []) - set(MIX_KINDS))
    if unknown:
        raise CultvlmError(f"{yaml_path + ': ' if yaml_path else ''}mix must list line kinds ({', '.join(MIX_KINDS)}), got {', '.join(unknown)}")
    if not cfg.data:
        raise CultvlmError("--data is required: a folder with train.jsonl and valid.jsonl")
    check_budget(cfg.min_pixels, cfg.max_pixels)
    return cfg


# ---------------------------------------------------------------- adapters

TIED_HEAD = "target lm_head: this model ties lm_head to the embeddings (3B does); drop it from targets"


def resolve_targets(model, cfg: LoraConfig) -> list[str]:
    """Full module names (from the model root) that get LoRA."""
    modules = dict(model.named_modules())
    keys = []
    for suffix in cfg.targets:
        if suffix == "lm_head":
            if "language_model.lm_head" not in modules:
                raise CultvlmError(TIED_HEAD)
            keys.append("language_model.lm_head")
            continue
        found = [n for n in modules if n.startswith("language_model.model.layers.")
                 and n.endswith("." + suffix)]
        if not found:
            raise CultvlmError(f"target {suffix!r} matches no linear layer of the language model")
        keys += found
    if cfg.vision != "none":
        for suffix in VISION_LINEARS[cfg.vision]:
            keys += [n for n in modules if n.startswith("vision_tower.") and n.endswith("." + suffix)]
    return sorted(set(keys), key=lambda n: list(modules).index(n))


def adapter_config(cfg: LoraConfig, keys: list[str], base: dict) -> dict:
    """adapter_config.json as stock mlx_vlm.load(..., adapter_path=...) reads it."""
    return {
        "fine_tune_type": "lora",
        "num_layers": -1,
        "lora_parameters": {"rank": cfg.rank, "dropout": cfg.dropout,
                            "scale": cfg.alpha / cfg.rank, "keys": keys},
        "base_model": base,
    }


# ---------------------------------------------------------------- forward and loss

def batch_loss(model, input_ids, features, gather_index, position_ids, target_rows, targets, weights):
    """(sum of cross-entropy over target tokens, their count). Image features replace the
    image-pad embeddings by one gather; logits are computed only at target rows."""
    lm = model.language_model
    embeds = lm.model.embed_tokens(input_ids)
    B, L, D = embeds.shape
    if features is not None:
        embeds = with_image_features(embeds, features, gather_index)
    h = lm.model(None, inputs_embeds=embeds, position_ids=position_ids)
    logits = lm_head(model, h.reshape(B * L, D)[target_rows]).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, targets) * weights
    return ce.sum(), weights.sum()


@dataclass
class StepInputs:
    """A batch as arrays for the loss; built on the host (numpy) so the step needs no syncs."""
    input_ids: mx.array
    pixel_values: mx.array | None
    grid: mx.array | None
    gather_index: mx.array | None
    position_ids: mx.array
    target_rows: mx.array
    targets: mx.array
    weights: mx.array
    n_tokens: int  # non-padding tokens, for throughput
    n_targets: int


def step_inputs(model, batch: Batch, image_pad_id: int, bucket: int = 1) -> StepInputs:
    ids = batch.input_ids
    B, L = ids.shape
    ids_mx = mx.array(ids)
    gather = grid = pixels = None
    if batch.image_grid_thw is not None:
        gather, grid = mx.array(image_gather_index(ids, image_pad_id)), mx.array(batch.image_grid_thw)
        pixels = None if batch.pixel_values is None else mx.array(batch.pixel_values)
    position_ids, _ = model.language_model.get_rope_index(ids_mx, grid, None, mx.array(batch.attention_mask))
    # Row t predicts token t+1: rows whose next token carries loss.
    next_is_target = np.zeros_like(batch.loss_mask)
    next_is_target[:, :-1] = batch.loss_mask[:, 1:]
    rows = np.nonzero(next_is_target.reshape(-1))[0].astype(np.int32)
    targets = ids.reshape(-1)[rows + 1]
    padded = -(-len(rows) // bucket) * bucket  # a compiled step: few distinct shapes
    pad = padded - len(rows)
    weights = np.concatenate([np.ones(len(rows), np.float32), np.zeros(pad, np.float32)])
    rows = np.concatenate([rows, np.zeros(pad, np.int32)])
    targets = np.concatenate([targets, np.zeros(pad, np.int32)])
    return StepInputs(ids_mx, pixels, grid, gather, position_ids, mx.array(rows), mx.array(targets),
                      mx.array(weights), int(batch.attention_mask.sum()), int(batch.loss_mask.sum()))


COMPILED_PAD = 32  # a compiled step recompiles for every new shape: lengths rounded up to this


def batch_inputs(model, samples: list[Sample], encoder: SampleEncoder, cached: bool,
                 compiled: bool = False) -> StepInputs:
    """A batch of samples as step inputs. Uncompiled, rows are padded to the longest sample
    only: padding costs as much compute as real tokens (up to a quarter of a short batch when
    rounded up to 32)."""
    pad = COMPILED_PAD if compiled else 1
    return step_inputs(model, make_batch(samples, encoder, pad_to_multiple=pad, pixels=not cached),
                       encoder.image_pad_id, bucket=pad)


def wire_weights() -> None:
    """On a Mac, keep the weights wired (never paged out), as mlx-lm does. Metal only: the CPU
    and MLX's CUDA backend have no wired limit."""
    if mx.metal.is_available():
        mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])


def make_grad_fn(model, vision_trainable: bool, use_compile: bool):
    """f(StepInputs) -> ((loss_sum, n_targets), grads of loss_sum w.r.t. the adapters).

    With a frozen vision tower its features are computed outside the differentiated function
    (no backward through it), and the language-model step can be compiled. With LoRA on the
    vision side the vision tower runs inside it, uncompiled (it reads the grid on the host).
    """
    if vision_trainable:
        def loss(model, s):
            feats = image_features(model, s.pixel_values, s.grid) if s.pixel_values is not None else None
            return batch_loss(model, s.input_ids, feats, s.gather_index, s.position_ids,
                              s.target_rows, s.targets, s.weights)
        value_and_grad = nn.value_and_grad(model, loss)
        return lambda s, feats=None: value_and_grad(model, s)

    def loss(model, input_ids, feats, gather_index, position_ids, target_rows, targets, weights):
        return batch_loss(model, input_ids, feats, gather_index, position_ids, target_rows, targets, weights)

    value_and_grad = nn.value_and_grad(model, loss)
    with_image = lambda *args: value_and_grad(model, *args)
    without_image = lambda ids, *rest: value_and_grad(model, ids, None, None, *rest)
    if use_compile:
        state = [model.state, mx.random.state]
        with_image = mx.compile(with_image, inputs=state, outputs=state)
        without_image = mx.compile(without_image, inputs=state, outputs=state)

    def grad_fn(s: StepInputs, feats: mx.array | None = None):
        if s.grid is None:
            return without_image(s.input_ids, s.position_ids, s.target_rows, s.targets, s.weights)
        if feats is None:
            feats = image_features(model, s.pixel_values, s.grid)
        return with_image(s.input_ids, mx.stop_gradient(feats), s.gather_index, s.position_ids, s.target_rows,
                          s.targets, s.weights)
    return grad_fn


def memory_plan_line(model_dir: Path, model, cfg: LoraConfig, samples: list[Sample], cached: bool) -> str:
    """`cultvlm plan`'s formula for this run's real sequences and feature cache, before the
    first step: the plan's defaults (64 text tokens, --images) may be far from the data."""
    config = read_config(model_dir)
    pads = [int((s.input_ids == config.get("image_token_id")).sum()) for s in samples]
    image_tokens = max(pads)
    text_tokens = max(len(s.input_ids) - n for s, n in zip(samples, pads))
    images = len({str(p) for s in samples for p in s.image_paths}) if cached else 0
    floats = [v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    quantization = config.get("quantization") or {}
    arch = Arch.from_config(config)
    step = Step(bits=quantization.get("bits"), group_size=quantization.get("group_size", 64),
                float_bytes=4 if mx.float32 in floats else 2, rank=cfg.rank, targets=tuple(cfg.targets),
                batch=cfg.batch_size, image_tokens=image_tokens, text_tokens=text_tokens,
                grad_checkpoint=cfg.grad_checkpoint, cached_images=images)
    cache = feature_cache_bytes(arch, step)
    size = lambda n: f"{n / GB:.2f} GiB" if n >= GB / 10 else f"{n / 2 ** 20:.1f} MiB"
    return (f"memory plan for this data: sequences up to {image_tokens} image + {text_tokens} text tokens, "
            + (f"vision features of {images} images kept ({size(cache)}), " if cached else "")
            + f"peak about {size(predict_training(arch, step).total)} "
            f"(`cultvlm plan` assumes --text-tokens 64 --images 1000 unless told)")


class FeatureCache:
    """The frozen vision tower's output per (image, size), computed the first time an image is
    seen and reused every later epoch: with no LoRA on the vision side and no augmentation it
    can never change within a run. Features stay in memory (256 tokens x 3584 bf16 = 1.8 MB
    per 448-px image on 7B)."""

    def __init__(self, model, encoder: SampleEncoder):
        self.model, self.encoder, self.store = model, encoder, {}

    def __call__(self, samples: list[Sample]) -> mx.array | None:
        keys = [(str(path), h, w) for s in samples for path, h, w in s.images]
        if not keys:
            return None
        missing = [k for k in dict.fromkeys(keys) if k not in self.store]
        if missing:
            pixels, grid = preprocess(self.encoder, [(Path(p), h, w) for p, h, w in missing])
            feats = image_features(self.model, mx.array(pixels), mx.array(grid))
            ends = np.cumsum(grid.prod(axis=1) // 4)[:-1].tolist()
            parts = mx.split(feats, ends) if ends else [feats]
            mx.eval(parts)
            self.store.update(zip(missing, parts))
        return mx.concatenate([self.store[k] for k in keys])


class StageTimer:
    """`cultvlm lora --profile`: wall time per stage of every step. Each stage is evaluated on
    its own -- the forward pass runs once more to be timed apart from the backward -- so a
    profiled step is slower than a plain one; the shares are what matters."""

    STAGES = ("images + batch", "vision tower", "LM forward", "LM backward", "optimizer")

    def __init__(self):
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self.batches = 0

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] += time.perf_counter() - start

    def step(self, model, grad_fn, cache, samples, encoder, vision_trainable: bool, compiled: bool):
        self.batches += 1
        with self.stage("images + batch"):
            s = batch_inputs(model, samples, encoder, cache is not None, compiled)
        with self.stage("vision tower"):
            feats = None
            if s.grid is not None:
                feats = cache(samples) if cache else image_features(model, s.pixel_values, s.grid)
                mx.eval(feats)
        model.eval()  # no dropout: the timing pass must not draw from the RNG the real step uses
        start = time.perf_counter()
        mx.eval(batch_loss(model, s.input_ids, feats, s.gather_index, s.position_ids, s.target_rows,
                           s.targets, s.weights))
        forward = time.perf_counter() - start
        model.train()
        self.seconds["LM forward"] += forward
        start = time.perf_counter()
        # With LoRA on the vision side the tower runs again inside the gradient.
        (loss, n), grads = grad_fn(s, None if vision_trainable else feats)
        mx.eval(loss, grads)
        self.seconds["LM backward"] += max(0.0, time.perf_counter() - start - forward)
        return s, (loss, n), grads

    def summary(self) -> dict:
        total = sum(self.seconds.values())
        return {"batches": self.batches, "seconds": self.seconds,
                "share": {k: v / total if total else 0.0 for k, v in self.seconds.items()}}

    def report(self) -> str:
        summary = self.summary()
        lines = [f"profile over {self.batches} batches (each stage timed apart; see profile.json):"]
        for name in self.STAGES:
            per_batch = 1000 * self.seconds[name] / max(1, self.batches)
            lines.append(f"  {name:<15} {per_batch:9.1f} ms/batch  {100 * summary['share'][name]:5.1f}%")
        return "\n".join(lines)


def evaluate_loss(model, samples: list[Sample], encoder: SampleEncoder, batch_size: int,
                  cache: FeatureCache | None = None) -> float:
    """Mean cross-entropy per target token over `samples` (no dropout)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        s = batch_inputs(model, chunk, encoder, cache is not None)
        if cache is not None:
            feats = cache(chunk)
        else:
            feats = image_features(model, s.pixel_values, s.grid) if s.grid is not None else None
        loss_sum, n = batch_loss(model, s.input_ids, feats, s.gather_index, s.position_ids,
                                 s.target_rows, s.targets, s.weights)
        mx.eval(loss_sum, n)
        total, count = total + loss_sum.item(), count + n.item()
    model.train()
    return total / count


# ---------------------------------------------------------------- data order

def batch_order(n_samples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a permutation fixed by (seed, epoch), so resuming at
    (epoch, index) replays exactly the same data."""
    perm = np.random.default_rng([seed, epoch]).permutation(n_samples)
    return [perm[i:i + batch_size].tolist() for i in range(0, n_samples, batch_size)]


def learning_rate_schedule(cfg: LoraConfig):
    warmup = min(cfg.warmup_steps, cfg.steps - 1)
    decay = optim.cosine_decay(cfg.learning_rate, max(cfg.steps - warmup, 1),
                               end=cfg.learning_rate * cfg.min_lr_ratio)
    if warmup <= 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(cfg.learning_rate / warmup, cfg.learning_rate, warmup), decay],
                                [warmup])


# ---------------------------------------------------------------- checkpoints

def save_arrays(path: Path, arrays: dict) -> None:
    """mx.save_safetensors through a Python file object: given a path, MLX does not report a
    failed write (a full disk leaves a short file and no error); through a file object the
    failure is an OSError."""
    with open(path, "wb") as f:
        mx.save_safetensors(f, arrays)


def save_checkpoint(folder: Path, model, optimizer, state: dict) -> None:
    """Adapters, optimizer state, step and data position, written to a partial folder and
    renamed into place: a killed run leaves the previous checkpoint or the new one."""

    partial = folder.with_name(f".{folder.name}.partial")
    try:
        partial = partial_folder(folder)
        save_arrays(partial / "adapters.safetensors", dict(tree_flatten(model.trainable_parameters())))
        save_arrays(partial / "optimizer.safetensors", dict(tree_flatten(optimizer.state)))
        write_json(partial / "state.json", state)
    except OSError as e:  # disk full, quota, read-only: the previous checkpoint is still whole
        shutil.rmtree(partial, ignore_errors=True)
        kept = "the previous checkpoint is kept" if folder.exists() else "no checkpoint was kept"
        raise CultvlmError(f"{folder}: could not save the checkpoint of step {state.get('step')} "
                           f"({e.strerror or e}); {kept} -- free some space and run again with --resume") from None
    replace_folder(partial, folder)


def load_checkpoint(folder: Path, model, optimizer, cfg: LoraConfig) -> dict:
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    saved = state["config"]
    changed = sorted(k for k in saved if k not in RESUMABLE_CHANGES and saved[k] != asdict(cfg).get(k))
    if changed:
        raise CultvlmError(f"{folder}: cannot resume, the run was started with different "
                           f"{', '.join(f'{k} ({saved[k]!r} -> {getattr(cfg, k)!r})' for k in changed)}")
    model.load_weights(list(mx.load(str(folder / "adapters.safetensors")).items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(folder / "optimizer.safetensors")).items()))
    return state


# ---------------------------------------------------------------- the run

# Every name a run writes in its --out: all that --force may delete.
OWN_FILES = ("checkpoint", ".checkpoint.*", "train_log.jsonl", ".train_log.jsonl.tmp", "adapters.safetensors",
             ".adapters.partial.safetensors", "adapter_config.json", "adapter_config.json.tmp", "config.yaml",
             "loss_curve.png", "profile.json*", TRAINED_ON, TRAINED_ON + ".tmp")


def prepare_output(out: Path, resume: bool, force: bool) -> None:
    old_checkpoint = out / ".checkpoint.old"
    if resume and not (out / "checkpoint").exists() and (old_checkpoint / "state.json").is_file():
        # Killed between the two renames of save_checkpoint's swap: the previous checkpoint,
        # complete, was moved aside and the new one not yet moved in. Put the previous one back.
        os.replace(old_checkpoint, out / "checkpoint")
    previous = [p for p in ("checkpoint", "train_log.jsonl", "adapters.safetensors") if (out / p).exists()]
    if previous and not (resume or force):
        raise CultvlmError(f"{out}: holds a previous run ({', '.join(previous)}); pass --resume "
                           "to continue it or --force to start over")
    if resume and not (out / "checkpoint" / "state.json").is_file():
        raise CultvlmError(f"{out / 'checkpoint'}: no checkpoint to resume from")
    if force and not resume:
        remove_own(out, "lora", OWN_FILES)
    out.mkdir(parents=True, exist_ok=True)


@dataclass
class TrainResult:
    out: Path
    model: object  # the model with its trained adapters, in memory
    processor: object
    encoder: SampleEncoder


def train(cfg: LoraConfig, resume: bool = False, force: bool = False, stop_after: int | None = None,
          progress: bool = True, profile: bool = False) -> TrainResult:
    """Run (or resume) a LoRA training. `stop_after` ends the run after that many optimizer
    steps as if it had been killed (for tests); `profile` times each stage of every step."""

    out = Path(cfg.out)
    data = Path(cfg.data)
    # Data parallel: every rank holds the whole model and a share of each global batch; rank 0
    # alone writes the log, checkpoints and adapters.
    world = mx.distributed.init(strict=True) if cfg.distributed else None
    lead = world is None or world.rank() == 0
    say = print if lead else (lambda *args, **kwargs: None)
    model_dir = resolve_model(cfg.model, cfg.models_dir)
    check_out_apart(out, "lora", data=data, model=model_dir)
    if "lm_head" in cfg.targets and read_config(model_dir).get("tie_word_embeddings"):
        raise CultvlmError(TIED_HEAD)  # before anything loads or is written
    with output_lock(out, "lora") if lead else nullcontext():  # rank 0 writes for all
        if lead:
            prepare_output(out, resume, force)

        # 1. model
        model, processor = load_model(str(model_dir))
        wire_weights()

        # 2. data: every sample checked before the first step
        encoder = SampleEncoder(processor, cfg.min_pixels, cfg.max_pixels, cfg.max_seq_len)
        train_set, bad_train = load_split(data / "train.jsonl", encoder, cfg.skip_bad_samples, cfg.mix)
        valid_set, bad_valid = load_split(data / "valid.jsonl", encoder, cfg.skip_bad_samples, cfg.mix)
        for problem in bad_train + bad_valid:
            say(f"skipped: {problem}")
        shrunk = sum(s.shrunk for s in train_set + valid_set)
        say(f"data: {len(train_set)} train, {len(valid_set)} valid samples"
              + (f", {len(bad_train) + len(bad_valid)} skipped" if bad_train or bad_valid else "")
              + (f", {shrunk} given fewer pixels to fit max_seq_len {cfg.max_seq_len}" if shrunk else ""))

        say(memory_plan_line(model_dir, model, cfg, train_set + valid_set,
                             cached=cfg.vision == "none" and cfg.feature_cache))

        # 3. adapters
        mx.random.seed(cfg.seed)
        keys = resolve_targets(model, cfg)
        attach_lora(model, keys, cfg.rank, cfg.alpha / cfg.rank, cfg.dropout)
        layer_class = type(model.language_model.model.layers[0])
        plain_call = layer_class.__call__
        if cfg.grad_checkpoint:
            from mlx_lm.tuner.trainer import grad_checkpoint

            grad_checkpoint(model.language_model.model.layers[0])  # patches the decoder-layer class
        try:
            return _train_loop(cfg, out, model, processor, encoder, train_set, valid_set, keys,
                               model_dir, resume, stop_after, progress and lead, world, say,
                               StageTimer() if profile else None)
        finally:
            layer_class.__call__ = plain_call  # undo the patch: later models in this process run plainly


def _train_loop(cfg, out, model, processor, encoder, train_set, valid_set, keys, model_dir,
                resume, stop_after, progress, world, say, timer: StageTimer | None) -> TrainResult:
    rank, ranks = (world.rank(), world.size()) if world else (0, 1)
    lead = rank == 0
    model.train()
    n_trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    say(f"LoRA: {len(keys)} layers, rank {cfg.rank}, {n_trainable:,} trainable parameters"
        + (f"; data parallel over {ranks} processes" if ranks > 1 else ""))

    # 4. optimizer
    optimizer = optim.AdamW(learning_rate=learning_rate_schedule(cfg), weight_decay=cfg.weight_decay)
    optimizer.init(model.trainable_parameters())
    grad_fn = make_grad_fn(model, cfg.vision != "none", cfg.compile)
    cache = FeatureCache(model, encoder) if cfg.vision == "none" and cfg.feature_cache else None

    step, epoch, position = 0, 0, 0
    log_path = out / "train_log.jsonl"
    if resume and lead:
        state = load_checkpoint(out / "checkpoint", model, optimizer, cfg)
        step, epoch, position = state["step"], state["epoch"], state["position"]
        kept = [line for line in log_path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= step] if log_path.exists() else []
        # Via a temporary file: a kill mid-rewrite must not leave the log truncated.
        tmp = log_path.with_name(f".{log_path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, log_path)
        say(f"resumed at step {step}")
    elif lead:
        log_path.write_text("", encoding="utf-8")
    if resume and world:  # the other ranks take the checkpoint from rank 0
        model.update(_from_rank0(model.trainable_parameters(), lead))
        optimizer.state = _from_rank0(optimizer.state, lead)
        step, epoch, position = _from_rank0(mx.array([step, epoch, position]), lead).tolist()
    if lead:
        (out / "config.yaml").write_text(_yaml(asdict(cfg) | {"resolved_targets": keys}), encoding="utf-8")

    # 5. loop
    base = base_identity(model_dir)
    global_batch = cfg.batch_size * ranks
    cursor = Cursor(epoch, position, batch_order(len(train_set), global_batch, cfg.seed, epoch))
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    steps_this_run = 0
    while step < cfg.steps:
        mx.random.seed(cfg.seed * 1_000_003 + step)  # dropout masks depend only on (seed, step)
        start = time.perf_counter()
        grads_sum, loss_sum, n_targets, n_tokens = _accumulate(cfg, model, grad_fn, cache, encoder, train_set,
                                                               cursor, rank, global_batch, timer)
        if world:  # sums over ranks, so the step is the mean over every target token of the global batch
            grads_sum = tree_map(mx.distributed.all_sum, grads_sum)
            loss_sum, n_targets, n_tokens = mx.distributed.all_sum(
                mx.array([loss_sum, n_targets, n_tokens], dtype=mx.float32)).tolist()
            n_targets, n_tokens = int(n_targets), int(n_tokens)
        # The mean over every target token of the accumulated batches, not a mean of means.
        grads = tree_map(lambda g: g / n_targets, grads_sum)
        grads, grad_norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        stop_if_not_finite(loss_sum / n_targets, grad_norm.item(), step + 1, out, cfg, bar)
        with timer.stage("optimizer") if timer else nullcontext():
            optimizer.update(model, grads)
            mx.eval(model.trainable_parameters(), optimizer.state, grad_norm)
        lr = optimizer.learning_rate.item()  # set by update() from the schedule: the rate just used
        step += 1
        steps_this_run += 1
        seconds = time.perf_counter() - start
        entry = {"step": step, "loss": loss_sum / n_targets, "lr": lr, "grad_norm": grad_norm.item(),
                 "target_tokens": n_targets, "tokens": n_tokens, "tokens_per_s": n_tokens / seconds,
                 "peak_memory_gb": mx.get_peak_memory() / GB, "val_loss": None}
        bar.update(1)
        if lead and (step % cfg.val_every == 0 or step == cfg.steps):
            entry["val_loss"] = evaluate_loss(model, valid_set, encoder, cfg.batch_size, cache)
        if lead:
            with log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
            bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{entry['tokens_per_s']:.0f}",
                            peak=f"{entry['peak_memory_gb']:.2f}GB")
        if lead and (step % cfg.save_every == 0 or step == cfg.steps):
            try:
                save_checkpoint(out / "checkpoint", model, optimizer,
                                {"step": step, "epoch": cursor.epoch, "position": cursor.position, "seed": cfg.seed,
                                 "rng": "mx.random.seed(seed * 1000003 + step) before each step",
                                 "config": asdict(cfg)})
            except CultvlmError:
                bar.close()  # ends the progress line: the error gets a line of its own
                raise
        if stop_after is not None and steps_this_run >= stop_after:
            bar.close()
            return TrainResult(out, model, processor, encoder)
    bar.close()

    # 6. save
    if timer and lead:
        say(timer.report())
        write_json(out / "profile.json", timer.summary())
    if lead:
        trained = training_record((p for s in train_set for p in s.image_paths), read_training_record(model_dir))
        _save_adapters(out, model, adapter_config(cfg, keys, base), trained)
        _plot_losses(log_path, out / "loss_curve.png", len(train_set), len(valid_set))
        say(f"adapters written to {out}")
    return TrainResult(out, model, processor, encoder)


@dataclass
class Cursor:
    """Where the loop is in the data: the epoch, the next batch, and that epoch's batch order."""
    epoch: int
    position: int
    order: list[list[int]]


def _accumulate(cfg: LoraConfig, model, grad_fn, cache, encoder: SampleEncoder, train_set: list[Sample],
                cursor: Cursor, rank: int, global_batch: int, timer: StageTimer | None):
    """One optimizer step's gradients, summed over cfg.grad_accum batches (this rank's share of
    each), with the summed loss, target tokens and tokens; `cursor` moves past those batches."""
    grads_sum, loss_sum, n_targets, n_tokens = None, 0.0, 0, 0
    for _ in range(cfg.grad_accum):
        if cursor.position >= len(cursor.order):
            cursor.epoch, cursor.position = cursor.epoch + 1, 0
            cursor.order = batch_order(len(train_set), global_batch, cfg.seed, cursor.epoch)
        share = cursor.order[cursor.position][rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
        cursor.position += 1
        if not share:  # the last batch of an epoch may not reach every rank
            continue
        samples = [train_set[i] for i in share]
        if timer:
            inputs, (loss, _), grads = timer.step(model, grad_fn, cache, samples, encoder, cfg.vision != "none",
                                                  cfg.compile)
        else:
            inputs = batch_inputs(model, samples, encoder, cache is not None, cfg.compile)
            (loss, _), grads = grad_fn(inputs, cache(samples) if cache else None)
        grads_sum = grads if grads_sum is None else tree_map(mx.add, grads_sum, grads)
        mx.eval(grads_sum, loss)
        loss_sum += loss.item()
        n_targets += inputs.n_targets
        n_tokens += inputs.n_tokens
    if grads_sum is None:
        grads_sum = tree_map(mx.zeros_like, model.trainable_parameters())
    return grads_sum, loss_sum, n_targets, n_tokens


def stop_if_not_finite(loss: float, grad_norm: float, step: int, out: Path, cfg: LoraConfig, bar) -> None:
    """Before the update that would spread it into the weights: a NaN or infinite loss or
    gradient norm ends the run, keeping the last checkpoint and writing no adapters."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    bar.close()
    state = out / "checkpoint" / "state.json"
    kept = (f"the last good checkpoint (step {json.loads(state.read_text())['step']}) is kept in "
            f"{state.parent}" if state.is_file() else "no checkpoint was saved yet")
    raise CultvlmError(f"step {step}: loss {loss}, gradient norm {grad_norm}: training stopped before the "
                       f"update, no adapters written; {kept}. Try a lower learning_rate (now "
                       f"{cfg.learning_rate:g}) or more warmup_steps (now {cfg.warmup_steps})")


def _from_rank0(tree, lead: bool):
    """Rank 0's values on every rank (a sum in which the other ranks add zeros). The arrays go
    in order of their names: rank 0's tree was read from a checkpoint, the others' built in
    place, and the collectives of all ranks must pair up."""
    if isinstance(tree, mx.array):
        return mx.distributed.all_sum(tree if lead else mx.zeros_like(tree))
    pairs = sorted(tree_flatten(tree), key=lambda kv: kv[0])
    return tree_unflatten([(k, mx.distributed.all_sum(v if lead else mx.zeros_like(v))) for k, v in pairs])


def _save_adapters(out: Path, model, config: dict, trained: dict) -> None:
    tmp = out / ".adapters.partial.safetensors"
    try:
        write_json(out / TRAINED_ON, trained)  # first: adapters never exist without it
        save_arrays(tmp, dict(tree_flatten(model.trainable_parameters())))
        tmp.replace(out / "adapters.safetensors")
        write_json(out / "adapter_config.json", config)
    except OSError as e:  # disk full, quota, read-only
        tmp.unlink(missing_ok=True)
        raise CultvlmError(f"{out}: could not save the adapters ({e.strerror or e}); the last checkpoint "
                           f"is in {out / 'checkpoint'} -- free some space and run again with --resume") from None


def _yaml(obj: dict) -> str:
    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True)


def _plot_losses(log_path: Path, png: Path, n_train: int, n_valid: int) -> None:
    import matplotlib  # deferred: a second of import for the one plot at the end of a run

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([e["step"] for e in log], [e["loss"] for e in log], label=f"train (n={n_train} samples)")
    val = [e for e in log if e["val_loss"] is not None]
    if val:
        ax.plot([e["step"] for e in val], [e["val_loss"] for e in val], "o-", label=f"valid (n={n_valid} samples)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per assistant token")
    ax.set_yscale("log" if min(e["loss"] for e in log) > 0 else "linear")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("LoRA training loss")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
