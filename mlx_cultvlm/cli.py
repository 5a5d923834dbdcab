"""The `cultvlm` command line: one subcommand per verb, each a thin layer over its module."""

from __future__ import annotations

import click

from .images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

MODEL_HELP = "preset (3b, 3b-4bit, 7b, 7b-4bit, tiny, tiny-4bit, ...), local folder, or HF repo id"


@click.group()
@click.version_option(package_name="cultvlm")
def main():
    """cultvlm: teach Qwen2.5-VL regional culture with MLX."""


@main.command()
@click.option("--model", required=True, help=MODEL_HELP)
@click.option("--hf-path", help="source: a local Hugging Face folder or repo id (default: the preset's repo)")
@click.option("--out", type=click.Path(file_okay=False), help="output folder (default: the models dir / preset)")
@click.option("--bits", type=click.Choice(["4", "8", "none"]), default=None,
              help="quantize the language model to 4 or 8 bits (default: as the preset says)")
@click.option("--group-size", type=int, default=64, show_default=True, help="quantization group size")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="float dtype of unquantized weights (default: the checkpoint's)")
@click.option("--revision", help="Hugging Face revision (branch, tag or commit)")
@click.option("--models-dir", type=click.Path(file_okay=False), help="where converted models live")
@click.option("--force", is_flag=True, help="replace an existing output folder")
def convert(model, hf_path, out, bits, group_size, dtype, revision, models_dir, force):
    """Download Hugging Face Qwen2.5-VL weights and convert them to MLX (optionally 4/8-bit)."""
    from .convert import convert as run_convert

    bits_value = -1 if bits is None else (None if bits == "none" else int(bits))
    folder = run_convert(model, hf_path=hf_path, out=out, bits=bits_value, group_size=group_size,
                         dtype=dtype, revision=revision, force=force, models_root=models_dir)
    click.echo(f"converted model written to {folder}")


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--model", default="7b-4bit", show_default=True, help=MODEL_HELP)
@click.option("--adapter", type=click.Path(file_okay=False), help="LoRA adapter folder")
@click.option("--prompt", default=None, help="question to ask (default: who is in the picture, in Russian)")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--temp", type=float, default=0.0, show_default=True, help="0 = greedy")
@click.option("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, show_default=True,
              help="pixel budget per image (448*448 = 256 image tokens)")
@click.option("--min-pixels", type=int, default=DEFAULT_MIN_PIXELS, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--models-dir", type=click.Path(file_okay=False), help="where converted models live")
def generate(images, model, adapter, prompt, max_tokens, temp, max_pixels, min_pixels, seed, models_dir):
    """Ask a model about IMAGES; answers stream as they are generated."""
    from .generate import DEFAULT_PROMPT
    from .generate import generate as run_generate

    run_generate(list(images), model, adapter, prompt or DEFAULT_PROMPT, max_tokens, temp,
                 min_pixels, max_pixels, seed, models_root=models_dir)


if __name__ == "__main__":
    main()
