"""The `cultvlm` command line: one subcommand per verb, each a thin layer over its module.

Each verb imports its module when it runs: `cultvlm --help` or `cultvlm plan` need not load MLX,
mlx-vlm and transformers first."""

from __future__ import annotations

import click

from .images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

MODEL_HELP = "preset (3b, 3b-4bit, 7b, 7b-4bit, tiny, tiny-4bit, ...), local folder, or HF repo id"


class OneLineGroup(click.Group):
    """A bad flag, a missing argument or an unknown command is one line, as every other error
    is: click would print the usage and a hint above it. The line says where the options are."""

    @staticmethod
    def _one_line(error: click.UsageError) -> click.UsageError:
        if error.ctx is None:
            return error
        return click.UsageError(f"{error.format_message().strip()} "
                                f"(`{error.ctx.command_path} --help` lists the options)")

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as e:
            raise self._one_line(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # the subcommands' own parsing, and their subcommands'
            raise self._one_line(e) from None


@click.group(cls=OneLineGroup)
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


@main.command()
@click.option("--model", default=None, help=MODEL_HELP + " [default: 7b-4bit]")
@click.option("--data", default=None, type=click.Path(file_okay=False),
              help="dataset folder with train.jsonl and valid.jsonl")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="output folder [default: adapters/run]")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of options (flags win)")
@click.option("--steps", type=int, help="optimizer steps")
@click.option("--batch-size", type=int)
@click.option("--grad-accum", type=int, help="batches per optimizer step")
@click.option("--learning-rate", type=float)
@click.option("--rank", type=int)
@click.option("--alpha", type=float, help="LoRA scale = alpha / rank")
@click.option("--dropout", type=float)
@click.option("--vision", type=click.Choice(["none", "merger", "all"]), help="also adapt the vision side")
@click.option("--max-pixels", type=int)
@click.option("--min-pixels", type=int)
@click.option("--max-seq-len", type=int)
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None)
@click.option("--compile/--no-compile", "compile_step", default=None, help="mx.compile the language-model step")
@click.option("--feature-cache/--no-feature-cache", default=None,
              help="keep each image's vision features between epochs (faster; memory grows with the images)")
@click.option("--seed", type=int)
@click.option("--val-every", type=int, help="validation loss every N steps")
@click.option("--save-every", type=int, help="checkpoint every N steps")
@click.option("--distributed/--no-distributed", default=None,
              help="data-parallel over the processes `mlx.launch` starts (one Mac or several)")
@click.option("--skip-bad-samples/--fail-on-bad-samples", default=None,
              help="skip unreadable samples (counted) instead of failing before training")
@click.option("--models-dir", type=click.Path(file_okay=False))
@click.option("--resume", is_flag=True, help="continue from the last checkpoint in --out")
@click.option("--force", is_flag=True, help="delete a previous run in --out and start over")
@click.option("--profile", is_flag=True, help="time each stage of every step (images, vision, forward, backward, "
                                              "optimizer) and print where the time goes")
def lora(config_file, resume, force, compile_step, profile, **options):
    """Train LoRA adapters (QLoRA on a quantized base) on a dataset folder."""
    from .lora import load_config, train

    options["compile"] = compile_step
    cfg = load_config(config_file, options)
    train(cfg, resume=resume, force=force, profile=profile)


@main.command()
@click.option("--model", required=True, help=MODEL_HELP)
@click.option("--adapter", required=True, type=click.Path(file_okay=False), help="LoRA adapter folder")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="fused model folder to write")
@click.option("--dequantize", is_flag=True, help="write float16 weights instead of re-quantizing")
@click.option("--models-dir", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="replace an existing output folder")
def fuse(model, adapter, out, dequantize, models_dir, force):
    """Merge adapters into the base model; the result loads with stock mlx_vlm.load."""
    from .fuse import fuse as run_fuse

    folder = run_fuse(model, adapter, out, dequantize=dequantize, force=force, models_root=models_dir)
    click.echo(f"fused model written to {folder}")


@main.command("eval")
@click.option("--model", required=True, help=MODEL_HELP)
@click.option("--adapter", type=click.Path(file_okay=False), help="LoRA adapter folder")
@click.option("--data", type=click.Path(file_okay=False), help="dataset folder (from `cultvlm data build`)")
@click.option("--split", default="test", show_default=True)
@click.option("--images", type=click.Path(file_okay=False), help="instead of --data: probe a folder of images")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="run folder, e.g. runs/base-7b")
@click.option("--catalog", default="data/entities.json", show_default=True, type=click.Path(dir_okay=False))
@click.option("--baseline", type=click.Path(file_okay=False), help="the base model's run folder: adds control retention")
@click.option("--batch-size", type=int, default=20, show_default=True,
              help="items generated together (a picture's questions share its encoding; "
                   "on the CPU each core takes whole pictures)")
@click.option("--max-tokens", type=int, default=48, show_default=True)
@click.option("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, show_default=True)
@click.option("--min-pixels", type=int, default=DEFAULT_MIN_PIXELS, show_default=True)
@click.option("--models-dir", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="discard a run in --out made with other settings")
@click.option("--drop-trained", is_flag=True,
              help="leave out (and count) pictures the model or adapter was trained on, instead of refusing")
def eval_command(model, adapter, data, split, images, out, catalog, baseline, batch_size, max_tokens,
                 max_pixels, min_pixels, models_dir, force, drop_trained):
    """Ask the fixed probe set about every held-out image; write predictions and metrics."""
    from .evaluate import evaluate

    metrics = evaluate(model, out, data=data, images=images, split=split, adapter=adapter,
                       catalog_path=catalog, baseline=baseline, batch_size=batch_size,
                       max_tokens=max_tokens, min_pixels=min_pixels, max_pixels=max_pixels,
                       force=force, models_root=models_dir, drop_trained=drop_trained)
    from .metrics import naming
    from .report import fig_text

    shown = [(f"{role}s", naming(metrics, role)) for role in ("target", "control")]
    if metrics.get("baseline"):
        shown.append(("control retention", metrics["baseline"]["retention"]))
    shown.append(("false positives (a target named on a control or out-of-catalog picture)",
                  metrics["restraint"]["false_positives"]))
    click.echo("naming per picture (ru + en; k/n = share [95% Wilson interval], n = pictures):")
    for what, fig in shown:
        if fig["n"]:
            click.echo(f"  {what}: {fig_text(fig)}")
    click.echo(f"predictions and metrics written to {out}")
    return metrics


def _add_commands():
    from .demo import command as demo_command
    from .doctor import doctor_command
    from .experiment import command as experiment_command
    from .plan import plan_command
    from .report import command as compare_command

    for command in (compare_command, demo_command, doctor_command, experiment_command, plan_command):
        main.add_command(command)


_add_commands()


@main.group()
def data():
    """The entity catalog, images, captions and datasets (add, check, collect, caption, build)."""


def _add_data_commands():
    from .data import add, build, caption, check, collect

    for module in (add, check, collect, caption, build):
        data.add_command(module.command)


_add_data_commands()

if __name__ == "__main__":
    main()
