"""`cultvlm generate`: ask a model (base, with an adapter, or fused) about one or more images."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from .images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, check_budget, fit_to_budget, load_image
from .models import check_model_folder, resolve_model

DEFAULT_PROMPT = "Кто изображён на картинке?"


def load_model(model: str, adapter: str | None = None, models_root: str | None = None):
    """(model, processor) from a preset, folder or repo id; weights from safetensors only."""
    import mlx_vlm

    folder = resolve_model(model, models_root)
    check_model_folder(folder)
    model_obj, processor = mlx_vlm.load(str(folder), trust_remote_code=False)
    if adapter is not None:
        from .lora import load_adapter

        load_adapter(model_obj, folder, adapter)
    return model_obj, processor


def build_prompt(processor, question: str) -> str:
    """The model's own chat template around one image and a question."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def only_real_tokens(n_tokens: int):
    """A logits processor that never picks an id past the tokenizer's last token: the
    embedding has spare rows (151936 rows for 151665 tokens in 3B) that decode to nothing."""
    import mlx.core as mx

    def process(tokens, logits):
        if logits.shape[-1] <= n_tokens:
            return logits
        return mx.where(mx.arange(logits.shape[-1]) >= n_tokens, -mx.inf, logits)
    return process


def stream_answer(model, processor, image_path: str | Path, question: str = DEFAULT_PROMPT,
                  max_tokens: int = 128, temperature: float = 0.0,
                  min_pixels: int = DEFAULT_MIN_PIXELS,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[str]:
    """Yield the answer's text piece by piece as tokens are generated."""
    import mlx_vlm

    check_budget(min_pixels, max_pixels)
    image = fit_to_budget(load_image(image_path), min_pixels, max_pixels)
    prompt = build_prompt(processor, question)
    for chunk in mlx_vlm.stream_generate(model, processor, prompt, image=[image],
                                         max_tokens=max_tokens, temperature=temperature,
                                         logits_processors=[only_real_tokens(len(processor.tokenizer))]):
        yield chunk.text


def generate(images: list[str], model: str, adapter: str | None, question: str, max_tokens: int,
             temperature: float, min_pixels: int, max_pixels: int, seed: int,
             models_root: str | None = None) -> dict[str, str]:
    """Print each image's answer as it streams; return them all."""
    import click
    import mlx.core as mx

    check_budget(min_pixels, max_pixels)
    for path in images:  # fail before loading the model if any image is bad
        load_image(path)
    mx.random.seed(seed)
    model_obj, processor = load_model(model, adapter, models_root)
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
