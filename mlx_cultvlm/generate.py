"""`cultvlm generate`: ask a model (base, with an adapter, or fused) about one or more images."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import click
import mlx.core as mx
import mlx_vlm
import numpy as np
from mlx_vlm.models.cache import KVCache
from mlx_vlm.tokenizer_utils import make_streaming_detokenizer

from .errors import CultvlmError
from .images import (DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, check_budget, fit_to_budget, load_image,
                     num_image_tokens)
from .samples import IMAGE_PAD, VISION_END
from .settings import Count, NonNegative, NonNegativeCount, checked, settings_class
from .vlm import (float32_language_model_on_cpu, image_features, image_gather_index, lm_head, load_model,
                  with_image_features)

DEFAULT_PROMPT = "Кто изображён на картинке?"
# Qwen's control tokens (<|image_pad|>, <|im_end|>, ...): the chat template places them; in a
# question they would be read as control, not text.
CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")


@settings_class
class Decoding:
    """How answers are generated, by `generate` and `eval` alike: checked before a model loads."""
    max_tokens: Count = 128
    temperature: NonNegative = 0.0
    min_pixels: Count = DEFAULT_MIN_PIXELS
    max_pixels: Count = DEFAULT_MAX_PIXELS
    batch_size: Count = 1
    seed: NonNegativeCount = 0


def check_decoding(question: str | None = None, **values) -> Decoding:
    """The settings, checked (type, range, finite, the pixel budget), and the question's text."""
    decoding = checked(Decoding, values)
    check_budget(decoding.min_pixels, decoding.max_pixels)
    found = CONTROL_TOKEN.search(question or "")
    if found:
        raise CultvlmError(f"--prompt holds {found.group()}, one of Qwen's control tokens, which the chat "
                           "template places itself: remove it from the question")
    return decoding


REFERENCE_INTRO = "Образцы (reference pictures):\n"
QUESTION_INTRO = "Вопрос о следующей картинке (the question is about this picture):\n"


def build_prompt(processor, question: str, references: list[str] = ()) -> str:
    """The model's own chat template around one image and a question. `references` labels
    reference pictures shown first, one label after each (a prompting baseline)."""
    content = []
    if references:
        content.append({"type": "text", "text": REFERENCE_INTRO})
        for label in references:
            content += [{"type": "image"}, {"type": "text", "text": f" {label}\n"}]
        content.append({"type": "text", "text": QUESTION_INTRO})
    content += [{"type": "image"}, {"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def only_real_tokens(n_tokens: int):
    """A logits processor that never picks an id past the tokenizer's last token: the
    embedding has spare rows (151936 rows for 151665 tokens in 3B) that decode to nothing."""
    def process(tokens, logits):
        if logits.shape[-1] <= n_tokens:
            return logits
        return mx.where(mx.arange(logits.shape[-1]) >= n_tokens, -mx.inf, logits)
    return process


def run_side_by_side(jobs: list, streams: list | None = None) -> list:
    """Drive `answer_steps` generators together, each on its own stream (default: the default
    stream): every round each job builds its next step and yields what it needs evaluated, and
    one `mx.eval` runs them all, so MLX computes different streams side by side. Returns each
    job's result. One thread: MLX streams used from other threads can abort the process at exit."""
    streams = streams or [mx.default_stream(mx.default_device())] * len(jobs)
    results, live = [None] * len(jobs), list(range(len(jobs)))
    while live:
        wanted = []
        for k in list(live):
            with mx.stream(streams[k]):
                try:
                    wanted.append(next(jobs[k]))
                except StopIteration as finished:
                    results[k] = finished.value
                    live.remove(k)
        mx.eval(wanted)
    return results


def answer_steps(model, processor, images: list, questions: list[str], max_tokens: int,
                 references: list[tuple] = ()):
    """A generator of greedy answers to `questions[i]` about `images[i]` (PIL images already
    fitted to their pixel budget), generated together: it yields each decoding step's tokens to be
    evaluated and returns the answers (`run_side_by_side` drives it). `references` (picture,
    label) pairs come before every row's picture (`build_prompt`). Questions about one picture
    (the same object in `images`) share its work: the picture goes through the vision tower
    once, and the prompt up to the end of its image tokens (system turn and image) goes through
    the language model once; each question continues from a copy of that key/value cache.
    Prefixes of different lengths are padded on the left, questions of one length run together,
    and every gap is masked, so every row computes what it would alone."""
    tok, lm = processor.tokenizer, model.language_model
    number = {}  # id(picture) -> its row among the distinct pictures
    picture = [number.setdefault(id(image), len(number)) for image in images]
    unique = list({id(image): image for image in images}.values())
    shown = [r for r, _ in references]
    labels = [label for _, label in references]
    heads, tails = {}, []
    for image, u, question in zip(images, picture, questions):
        head, tail = build_prompt(processor, question, labels).rsplit(VISION_END, 1)
        parts = head.split(IMAGE_PAD)  # text around each picture's one pad token
        head = "".join(text + IMAGE_PAD * num_image_tokens(p.height, p.width)
                       for text, p in zip(parts, [*shown, image])) + parts[-1] + VISION_END
        heads.setdefault(u, tok.encode(head, add_special_tokens=False))
        tails.append(tok.encode(tail, add_special_tokens=False))
    heads = [heads[u] for u in range(len(unique))]

    def left_padded(rows):
        width = max(map(len, rows))
        ids = np.full((len(rows), width), tok.pad_token_id or 0, np.int32)
        valid = np.zeros((len(rows), width), bool)
        for r, row in enumerate(rows):
            ids[r, width - len(row):], valid[r, width - len(row):] = row, True
        return ids, valid

    def attention_mask(keys_before, valid):  # [rows, 1, L, before + L]: causal over valid keys
        L = valid.shape[1]
        own = np.tril(np.ones((L, L), bool))[None] & valid[:, None, :] | np.eye(L, dtype=bool)[None]
        before = np.broadcast_to(keys_before[:, None, :], (len(valid), L, keys_before.shape[1]))
        return mx.array(np.concatenate([before, own], axis=2)[:, None])

    # 1. Each picture's prefix, once. Image tokens take the vision tower's features, in order:
    # the reference pictures' (encoded once for all rows), then the row's own picture's.
    processed = processor.image_processor(images=shown + unique)
    grids = np.asarray(processed["image_grid_thw"])
    encoded = image_features(model, mx.array(np.asarray(processed["pixel_values"], np.float32)), mx.array(grids))
    ends = np.cumsum(grids.prod(axis=1) // model.config.vision_config.spatial_merge_size ** 2)
    per_picture = [encoded[a:b] for a, b in zip([0, *ends[:-1]], ends)]
    order = [[*range(len(shown)), len(shown) + u] for u in range(len(unique))]  # pictures of each prefix
    features = mx.concatenate([per_picture[i] for row in order for i in row])
    grid = mx.array(grids[np.concatenate(order)])
    ids, valid_head = left_padded(heads)
    embeds = with_image_features(lm.model.embed_tokens(mx.array(ids)), features,
                                 mx.array(image_gather_index(ids, tok.convert_tokens_to_ids(IMAGE_PAD))))
    positions, _ = lm.get_rope_index(mx.array(ids), grid, None, mx.array(valid_head.astype(np.int32)))
    cache = [KVCache() for _ in lm.model.layers]
    lm.model(None, inputs_embeds=embeds, mask=attention_mask(np.zeros((len(unique), 0), bool), valid_head),
             cache=cache, position_ids=positions)
    after_image = np.asarray(mx.max(mx.where(mx.array(valid_head)[None], positions, 0), axis=(0, 2))) + 1

    # 2. Every question after a copy of its picture's cache. Questions of one length run
    # together, so no padding is computed; their keys and values then join the others' with
    # masked zeros between the picture and the question (positions are already in the keys).
    P, S = cache[0].offset, max(map(len, tails))
    lengths, picture = np.array([len(t) for t in tails]), np.array(picture)
    parts = [[] for _ in cache], [[] for _ in cache]  # per layer: each group's keys, values
    rows_in_order, last = [], []
    for length in sorted(set(lengths.tolist())):
        rows = np.nonzero(lengths == length)[0]
        pics = picture[rows]
        group = [KVCache() for _ in cache]
        for g, c in zip(group, cache):
            g.keys, g.values, g.offset = c.keys[mx.array(pics), :, :P], c.values[mx.array(pics), :, :P], P
        position = after_image[pics][:, None] + np.arange(length)
        h = lm.model(mx.array([tails[r] for r in rows]),
                     mask=attention_mask(valid_head[pics], np.ones((len(rows), length), bool)),
                     cache=group, position_ids=mx.array(np.broadcast_to(position[None], (3, len(rows), length))))
        last.append(h[:, -1])
        gap = S - length
        for layer, g in enumerate(group):
            for kept, array in zip(parts, (g.keys, g.values)):
                head, tail = array[:, :, :P], array[:, :, P:P + length]
                zeros = mx.zeros((len(rows), array.shape[1], gap, array.shape[3]), array.dtype)
                kept[layer].append(mx.concatenate([head, zeros, tail], axis=2))
        rows_in_order += rows.tolist()
    back = mx.array(np.argsort(rows_in_order))  # from group order to row order
    for c, keys_of, values_of in zip(cache, *parts):
        c.keys, c.values = mx.concatenate(keys_of)[back], mx.concatenate(values_of)[back]
        c.offset = P + S
    B = len(tails)
    keys = np.concatenate([valid_head[picture], np.arange(S)[None] >= (S - lengths)[:, None]], axis=1)
    logits = lm_head(model, mx.concatenate(last)[back])

    # 3. Greedy decoding; a row that has ended leaves the batch (its cache rows are dropped).
    stop = set(np.atleast_1d(model.config.eos_token_id).tolist())
    real = mx.arange(logits.shape[-1]) < len(tok)  # spare embedding rows decode to nothing
    answers, alive = [[] for _ in range(B)], np.arange(B)
    position = after_image[picture] + lengths
    for step in range(max_tokens):
        # The argmax of the log-probabilities in the model's dtype, as the one-by-one path takes
        # it: rounding there can reorder near-ties, and both paths must pick the same token.
        logits = mx.where(real, logits, -mx.inf)
        token = mx.argmax(logits - mx.logsumexp(logits, axis=-1, keepdims=True), axis=-1)
        yield token  # evaluated by the caller, with the other jobs' steps
        token = np.asarray(token)
        going = np.array([t not in stop for t in token.tolist()])
        for row, t in zip(alive[going], token[going]):
            answers[row].append(int(t))
        if not going.any() or step == max_tokens - 1:
            break
        if not going.all():
            kept = mx.array(np.nonzero(going)[0])
            for c in cache:
                c.keys, c.values = c.keys[kept], c.values[kept]
            alive, token, keys, position = alive[going], token[going], keys[going], position[going]
        keys = np.concatenate([keys, np.ones((len(alive), 1), bool)], axis=1)
        h = lm.model(mx.array(token[:, None]), mask=mx.array(keys[:, None, None, :]), cache=cache,
                     position_ids=mx.array(np.broadcast_to(position[None, :, None], (3, len(alive), 1))))
        logits = lm_head(model, h[:, -1])
        position = position + 1
    return [_detokenize(processor, a) for a in answers]


def _detokenize(processor, ids: list[int]) -> str:
    """Text as the streaming path assembles it (partial UTF-8 bytes included)."""
    detokenizer = make_streaming_detokenizer(processor)
    for token in ids:
        detokenizer.add_token(token)
    detokenizer.finalize()
    return detokenizer.text


def stream_answer(model, processor, image_path: str | Path, question: str = DEFAULT_PROMPT,
                  max_tokens: int = 128, temperature: float = 0.0,
                  min_pixels: int = DEFAULT_MIN_PIXELS,
                  max_pixels: int = DEFAULT_MAX_PIXELS, references: list[tuple] = ()) -> Iterator[str]:
    """Yield the answer's text piece by piece as tokens are generated. `references`: (image
    path, label) pairs shown before the picture (`build_prompt`)."""
    check_budget(min_pixels, max_pixels)
    shown = [fit_to_budget(load_image(path), min_pixels, max_pixels) for path, _ in references]
    image = fit_to_budget(load_image(image_path), min_pixels, max_pixels)
    prompt = build_prompt(processor, question, [label for _, label in references])
    for chunk in mlx_vlm.stream_generate(model, processor, prompt, image=[*shown, image],
                                         max_tokens=max_tokens, temperature=temperature,
                                         logits_processors=[only_real_tokens(len(processor.tokenizer))]):
        yield chunk.text


def generate(images: list[str], model: str, adapter: str | None, question: str, max_tokens: int,
             temperature: float, min_pixels: int, max_pixels: int, seed: int,
             models_root: str | None = None) -> dict[str, str]:
    """Print each image's answer as it streams; return them all."""
    check_decoding(question, max_tokens=max_tokens, temperature=temperature, min_pixels=min_pixels,
                   max_pixels=max_pixels, seed=seed)
    for path in images:  # fail before loading the model if any image is bad
        load_image(path)
    mx.random.seed(seed)
    model_obj, processor = load_model(model, adapter, models_root)
    float32_language_model_on_cpu(model_obj)
    answers = {}
    for path in images:
        if len(images) > 1:
            click.echo(f"== {path}")
        pieces = []
        for piece in stream_answer(model_obj, processor, path, question, max_tokens,
                                   temperature, min_pixels, max_pixels):
            pieces.append(piece)
            click.echo(piece, nl=False)
        click.echo()
        answers[str(path)] = "".join(pieces)
    return answers
