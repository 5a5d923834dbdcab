"""The catalogue of bad inputs and what cultvlm answers to each: the single source of
docs/ERRORS.md and of tests/test_errors.py, which runs every row through the real CLI.

    python scripts/errors_doc.py           # rewrite docs/ERRORS.md from CASES
    python scripts/errors_doc.py --check   # exit 1 if docs/ERRORS.md is not what CASES give

Each case is run in a fresh folder (the working directory of the command), so the commands and
messages below are exactly what a user in such a folder types and reads. `<name>` stands for
a value only known when the test runs (the address of a fake server). In `expect`, every
string is one whole line of the output (stripped) and `…` matches anything; the first line of a
failing case is the `Error: ...` line, which is the only line the error prints.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "ERRORS.md"

GIGACHAT = ["data", "caption", "--provider", "gigachat", "--timeout", "0.5", "--retries", "1",
            "--retry-delay", "0.05"]


@dataclass(frozen=True)
class Case:
    id: str  # the test id; tests/test_errors.py has a setup for each
    group: str
    input: str  # the bad input, in words (Markdown)
    args: tuple[str, ...]  # after `cultvlm`
    exit: int
    expect: tuple[str, ...]  # whole output lines, `…` for any text
    kept: str  # what is not lost (checked: every file there before is byte-identical after,
    #           except those in `changes`)
    changes: tuple[str, ...] = ()  # files the command may rewrite (repairs)


def case(id, group, input, args, exit, expect, kept, changes=()):
    return Case(id, group, input, tuple(args), exit, tuple(expect), kept, tuple(changes))


LORA_YAML_CASES = [  # (key, case name, the line in run.yaml, the message)
    ("learning_rate", "nan", "learning_rate: .nan", "learning_rate must be a finite number, got nan"),
    ("learning_rate", "inf", "learning_rate: .inf", "learning_rate must be a finite number, got inf"),
    ("learning_rate", "negative", "learning_rate: -1e-4", "learning_rate must be greater than 0, got '-1e-4'"),
    ("learning_rate", "zero", "learning_rate: 0", "learning_rate must be greater than 0, got 0"),
    ("learning_rate", "word", "learning_rate: fast", "learning_rate must be a number, got 'fast'"),
    ("alpha", "nan", "alpha: .nan", "alpha must be a finite number, got nan"),
    ("alpha", "zero", "alpha: 0", "alpha must be greater than 0, got 0"),
    ("weight_decay", "nan", "weight_decay: .nan", "weight_decay must be a finite number, got nan"),
    ("weight_decay", "negative", "weight_decay: -0.1", "weight_decay must be greater than or equal to 0, got -0.1"),
    ("rank", "fraction", "rank: 4.5", "rank must be a whole number, got 4.5"),
    ("rank", "list", "rank: [1, 2]", "rank must be a whole number, got [1, 2]"),
    ("rank", "zero", "rank: 0", "rank must be greater than 0, got 0"),
    ("rank", "bool", "rank: true", "rank must be a whole number, got True"),
    ("targets", "empty", "targets: []", "targets must be a list of at least 1 item(s), got []"),
    ("targets", "string", "targets: q_proj", "targets must be a valid list, got 'q_proj'"),
    ("max_grad_norm", "negative", "max_grad_norm: -1", "max_grad_norm must be greater than or equal to 0, got -1"),
    ("max_grad_norm", "nan", "max_grad_norm: .nan", "max_grad_norm must be a finite number, got nan"),
    ("data", "number", "data: 12", "data must be a valid string, got 12"),
    ("dropout", "one", "dropout: 1.0", "dropout must be less than 1, got 1.0"),
    ("dropout", "negative", "dropout: -0.1", "dropout must be greater than or equal to 0, got -0.1"),
    ("steps", "zero", "steps: 0", "steps must be greater than 0, got 0"),
    ("batch_size", "negative", "batch_size: -2", "batch_size must be greater than 0, got -2"),
    ("warmup_steps", "negative", "warmup_steps: -1", "warmup_steps must be greater than or equal to 0, got -1"),
    ("min_lr_ratio", "two", "min_lr_ratio: 2", "min_lr_ratio must be less than or equal to 1, got 2"),
    ("vision", "yes", "vision: everything", "vision must be 'none', 'merger' or 'all', got 'everything'"),
    ("mix", "unknown", "mix: [naming, facts]",
     "mix must list line kinds (naming, fact, describe, verify_yes, verify_no, replay, unknown), got facts"),
    ("mix", "string", "mix: naming", "mix must be a valid list, got 'naming'"),
    ("seed", "negative", "seed: -1", "seed must be greater than or equal to 0, got -1"),
    ("max_seq_len", "zero", "max_seq_len: 0", "max_seq_len must be greater than 0, got 0"),
    ("compile", "word", "compile: maybe", "compile must be a valid boolean, unable to interpret input, got 'maybe'"),
    ("learning_rte", "typo", "learning_rte: 1e-4", "unknown field 'learning_rte'"),
]
GENERATE = ["generate", "photo.jpg", "--model", "tiny-4bit", "--models-dir", "models"]
EVAL = ["eval", "--model", "tiny-4bit", "--models-dir", "models", "--images", "probe", "--out", "runs/probe"]
CLI_CASES = [  # (case name, command, flags, the message)
    ("temp_nan_generate", GENERATE, ["--temp", "nan"], "temperature must be a finite number, got nan"),
    ("temp_negative_generate", GENERATE, ["--temp", "-1"], "temperature must be greater than or equal to 0, got -1.0"),
    ("max_tokens_negative_generate", GENERATE, ["--max-tokens", "-1"], "max_tokens must be greater than 0, got -1"),
    ("max_tokens_zero_generate", GENERATE, ["--max-tokens", "0"], "max_tokens must be greater than 0, got 0"),
    ("seed_negative_generate", GENERATE, ["--seed", "-3"], "seed must be greater than or equal to 0, got -3"),
    ("batch_size_zero_eval", EVAL, ["--batch-size", "0"], "batch_size must be greater than 0, got 0"),
    ("max_tokens_zero_eval", EVAL, ["--max-tokens", "0"], "max_tokens must be greater than 0, got 0"),
    ("learning_rate_nan_lora", ["lora", "--config", "run.yaml"], ["--learning-rate", "nan"],
     "run.yaml: learning_rate must be a finite number, got nan"),
    ("rank_negative_lora", ["lora", "--config", "run.yaml"], ["--rank", "-1"],
     "run.yaml: rank must be greater than 0, got -1"),
]
USAGE_CASES = [  # (case name, the command line, the message): click's own checks, one line too
    ("not_a_number_lora", ["lora", "--rank", "abc"],
     "Invalid value for '--rank': 'abc' is not a valid integer. (`cultvlm lora --help` lists the options)"),
    ("unknown_option_data", ["data", "build", "--bogus"],
     "No such option '--bogus'. Did you mean '--out'? (`cultvlm data build --help` lists the options)"),
    ("unknown_command", ["lroa"], "No such command 'lroa'. Did you mean 'lora'? (`cultvlm --help` lists the options)"),
    ("missing_image_generate", ["generate", "--model", "tiny-4bit"],
     "Missing argument 'IMAGES...'. (`cultvlm generate --help` lists the options)"),
]
GENERATE_WITH_ADAPTER = GENERATE + ["--adapter", "adapters/good"]
EVAL_WITH_ADAPTER = EVAL + ["--adapter", "adapters/good"]
DAMAGED_ADAPTERS = [  # (case name, the damage, the message)
    ("truncated", "`adapters.safetensors` cut in half (an interrupted copy)",
     "damaged: adapters.safetensors (… of … bytes); copy it again, or train again (--resume continues from the "
     "last checkpoint)"),
    ("random", "`adapters.safetensors` of random bytes",
     "damaged: adapters.safetensors (…); copy it again, or train again (--resume continues from the last "
     "checkpoint)"),
    ("empty", "`adapters.safetensors` of 0 bytes",
     "damaged: adapters.safetensors (…); copy it again, or train again (--resume continues from the last "
     "checkpoint)"),
    ("nan", "`adapters.safetensors` whose weights are NaN (a run that diverged)",
     "… tensor(s) hold NaN or infinite values (…): a run that diverged; train again with a lower learning_rate"),
]
OUT_CASES = [  # (case name, the mistake, command, the message, what is kept)
    ("lora_is_data", "`lora --out ds --force`, the dataset folder itself",
     ["lora", "--config", "run.yaml", "--out", "ds", "--force"],
     "--out ds: is the data ds of `cultvlm lora`; choose an --out apart from its inputs",
     "the dataset untouched (it used to be deleted)"),
    ("lora_inside_data", "`lora --out ds/adapters`, inside the dataset",
     ["lora", "--config", "run.yaml", "--out", "ds/adapters"],
     "--out ds/adapters: is inside the data ds of `cultvlm lora`; choose an --out apart from its inputs",
     "nothing written"),
    ("lora_force_user_files", "`lora --force` into a folder that also holds the user's notes",
     ["lora", "--config", "run.yaml", "--force"],
     "adapters/run: holds notes.txt, which `cultvlm lora` did not write, and it deletes only its own files: "
     "move them away or choose another --out",
     "the notes and the previous run untouched"),
    ("fuse_is_adapter", "`fuse --out` the adapter folder",
     ["fuse", "--model", "tiny-4bit", "--models-dir", "models", "--adapter", "adapters/good", "--out",
      "adapters/good", "--force"],
     "--out adapters/good: is the adapter adapters/good of `cultvlm fuse`; choose an --out apart from its inputs",
     "the adapter untouched"),
    ("fuse_is_model", "`fuse --out` the base model folder",
     ["fuse", "--model", "models/tiny-4bit", "--adapter", "adapters/good", "--out", "models/tiny-4bit",
      "--force"],
     "--out models/tiny-4bit: is the model models/tiny-4bit of `cultvlm fuse`; choose an --out apart from its "
     "inputs",
     "the base model untouched"),
    ("fuse_force_user_files", "`fuse --force` into a folder of the user's own files",
     ["fuse", "--model", "tiny-4bit", "--models-dir", "models", "--adapter", "adapters/good", "--out",
      "mine", "--force"],
     "mine: holds notes.txt, which `cultvlm fuse` did not write, and it deletes only its own files: move them "
     "away or choose another --out",
     "the user's files untouched"),
    ("convert_is_source", "`convert --out` the Hugging Face folder it reads",
     ["convert", "--model", "tiny", "--hf-path", "hf/tiny", "--out", "hf/tiny", "--force"],
     "--out hf/tiny: is the source hf/tiny of `cultvlm convert`; choose an --out apart from its inputs",
     "the checkpoint untouched"),
    ("eval_inside_data", "`eval --out` inside the dataset",
     ["eval", "--model", "tiny-4bit", "--models-dir", "models", "--data", "ds", "--out", "ds/runs"],
     "--out ds/runs: is inside the data ds of `cultvlm eval`; choose an --out apart from its inputs",
     "nothing written"),
    ("eval_force_user_files", "`eval --force` (other settings) into a run folder that also holds the user's notes",
     EVAL + ["--force", "--max-tokens", "5"],
     "runs/probe: holds notes.txt, which `cultvlm eval` did not write, and it deletes only its own files: move "
     "them away or choose another --out",
     "the notes and the earlier run untouched"),
    ("build_holds_images", "`data build --out` a folder that holds the images",
     ["data", "build", "--out", "data"],
     "--out data: holds the images data/images of `cultvlm data build`; choose an --out apart from its inputs",
     "the images untouched"),
    ("build_user_files", "`data build` into a folder of the user's own files",
     ["data", "build", "--out", "mine"],
     "mine: holds notes.txt, which `cultvlm data build` did not write, and it deletes only its own files: move "
     "them away or choose another --out",
     "the user's files untouched"),
    ("compare_is_run", "`compare --out` one of the runs it compares",
     ["compare", "runs/probe", "--out", "runs/probe"],
     "--out runs/probe: is the run runs/probe of `cultvlm compare`; choose an --out apart from its inputs",
     "the run untouched"),
]
CHECK = ["data", "check", "--min-images", "0"]
ADD = ["data", "add", "gena", "--images", "incoming"]
CASES = [
    # --- image files ---
    case("truncated_jpeg_generate", "images", "Truncated JPEG (a download cut in half)",
         ["generate", "broken.jpg", "--model", "tiny-4bit"], 1,
         ["Error: broken.jpg: cannot decode image (image file is truncated (…))"],
         "nothing is loaded or written: every image is decoded in full before the model loads"),
    case("truncated_jpeg_check", "images", "Truncated JPEG among the pictures of an entity",
         CHECK, 0,
         ["gena/broken.jpg: unreadable: cannot decode image (image file is truncated (…))",
          "2 file(s): 1 ok, 1 unreadable"],
         "originals untouched; the file is listed as a problem and left out of datasets"),
    case("zero_byte_generate", "images", "Zero-byte file",
         ["generate", "empty.jpg", "--model", "tiny-4bit"], 1,
         ["Error: empty.jpg: empty file (0 bytes)"],
         "nothing written"),
    case("zero_byte_add", "images", "Zero-byte file in a folder being added",
         ADD, 0,
         ["gena: copied 1 image(s) to data/images/gena, 0 already there",
          "skipped 1 file(s) that are not readable images:",
          "incoming/empty.jpg: empty file (0 bytes)"],
         "the good picture is copied, the empty one is not; the catalog keeps its entries"),
    case("text_as_jpg_generate", "images", "Text file named `.jpg`",
         ["generate", "notes.jpg", "--model", "tiny-4bit"], 1,
         ["Error: notes.jpg: not an image Pillow can read"],
         "nothing written"),
    case("text_as_jpg_check", "images", "Text file named `.jpg` among the pictures",
         CHECK, 0,
         ["gena/notes.jpg: unreadable: not an image Pillow can read", "2 file(s): 1 ok, 1 unreadable"],
         "originals untouched; skipped, counted"),
    case("cmyk_jpeg_check", "images", "CMYK JPEG (print workflow)",
         CHECK, 0,
         ["gena/cmyk.jpg: CMYK: converted to RGB on load, colours may shift", "2 file(s): 2 ok"],
         "usable; converted to RGB when loaded, the file is untouched"),
    case("png16_check", "images", "16-bit greyscale PNG",
         CHECK, 0,
         ["gena/grey16.png: I;16 (16-bit) grey: scaled to 8 bits on load", "2 file(s): 2 ok"],
         "usable; scaled by its 16-bit range (not clipped to white) when loaded"),
    case("palette_transparency_check", "images", "Palette PNG with a transparent colour",
         CHECK, 0,
         ["gena/palette.png: P with transparency: put on white on load", "2 file(s): 2 ok"],
         "usable; transparent pixels become white when loaded"),
    case("animated_gif_check", "images", "Animated GIF (3 frames)",
         CHECK, 0,
         ["gena/anim.gif: …animated (3 frames): only the first frame is used", "2 file(s): 2 ok"],
         "usable; the first frame is used"),
    case("animated_webp_check", "images", "Animated WebP (3 frames)",
         CHECK, 0,
         ["gena/anim.webp: …animated (3 frames): only the first frame is used", "2 file(s): 2 ok"],
         "usable; the first frame is used"),
    case("one_pixel_check", "images", "1×1 image",
         CHECK, 0,
         ["gena/dot.png: too_small", "gena/dot.png: 1x1 is under the minimum side of 64",
          "2 file(s): 1 ok, 1 too_small"],
         "originals untouched; skipped by `data build`, counted as too small"),
    case("bomb_generate", "images",
         "Decompression bomb: a 1-bit PNG whose header claims 20000×20000 pixels (a few bytes on disk)",
         ["generate", "bomb.png", "--model", "tiny-4bit"], 1,
         ["Error: bomb.png: refused, too many pixels (Image size (400000000 pixels) exceeds limit of "
          "178956970 pixels, could be decompression bomb DOS attack.)"],
         "refused before any pixel is decoded; nothing written"),
    case("bomb_check", "images", "The same decompression bomb among the pictures",
         CHECK, 0,
         ["gena/bomb.png: unreadable: refused, too many pixels (…)", "2 file(s): 1 ok, 1 unreadable"],
         "originals untouched; skipped, counted"),
    case("exif_rotated_check", "images", "Photo stored sideways with EXIF orientation 6",
         CHECK, 0,
         ["gena/photo.jpg: EXIF orientation 6: turned upright on load", "2 file(s): 2 ok"],
         "usable; turned upright when loaded (the manifest records the upright size)"),
    case("heic_generate", "images", "HEIC photo (an iPhone's `ftyp heic` file) and no HEIC decoder",
         ["generate", "IMG_0001.heic", "--model", "tiny-4bit"], 1,
         ["Error: IMG_0001.heic: HEIC/HEIF image, which Pillow cannot decode here; convert it to JPEG or PNG"],
         "nothing written"),
    case("heic_check", "images", "HEIC photo among the pictures",
         CHECK, 0,
         ["gena/IMG_0001.heic: unreadable: HEIC/HEIF image, which Pillow cannot decode here; "
          "convert it to JPEG or PNG", "2 file(s): 1 ok, 1 unreadable"],
         "originals untouched; skipped, counted"),
    case("non_utf8_name_check", "images", "File name that is not UTF-8 (`caf\\xe9.jpg`, Latin-1 bytes)",
         CHECK, 0,
         ["gena/caf\\xe9.jpg: unreadable: file name is not valid UTF-8; rename it",
          "2 file(s): 1 ok, 1 unreadable"],
         "originals untouched; the manifest is written (the name shown with `\\xNN`)"),
    case("non_utf8_name_add", "images", "File name that is not UTF-8 in a folder being added",
         ADD, 0,
         ["gena: copied 1 image(s) to data/images/gena, 0 already there",
          "skipped 1 file(s) that are not readable images:",
          "incoming/caf\\xe9.jpg: file name is not valid UTF-8; rename it"],
         "the other pictures are copied"),
    case("non_utf8_name_caption", "images", "File name that is not UTF-8 when captioning",
         ["data", "caption", "--provider", "offline"], 0,
         ["note: skipped data/images/gena/caf\\xe9.jpg: file name is not valid UTF-8; rename it",
          "1 new caption(s) in data/captions.jsonl; 0 image(s) already captioned; "
          "1 unreadable image(s) skipped"],
         "the other pictures are captioned; captions.jsonl stays valid UTF-8 JSON lines"),
    case("non_utf8_name_eval", "images", "File name that is not UTF-8 in a folder probed by `eval --images`",
         ["eval", "--model", "tiny-4bit", "--models-dir", "models", "--images", "probe", "--out", "runs/probe",
          "--max-pixels", "12544", "--max-tokens", "4"], 0,
         ["note: skipped probe/gena/caf\\xe9.jpg: file name is not valid UTF-8; rename it",
          "predictions and metrics written to runs/probe"],
         "the other pictures are evaluated; predictions.jsonl stays valid UTF-8 JSON lines"),
    # --- datasets and JSON files ---
    case("path_escape_eval", "data", "Dataset line whose image is `../../etc/passwd`",
         ["eval", "--model", "tiny-4bit", "--data", "ds", "--out", "runs/base"], 1,
         ["Error: ds/test.jsonl:1: image path '../../etc/passwd' points outside the dataset folder ds"],
         "nothing read outside the dataset, no run folder created"),
    case("path_escape_lora", "data", "Training line whose image is `../../etc/passwd`",
         ["lora", "--model", "tiny-4bit", "--models-dir", "models", "--data", "ds", "--out", "adapters/run"], 1,
         ["Error: 1 bad sample(s) in ds/train.jsonl: ds/train.jsonl:1: image path '../../etc/passwd' "
          "points outside the dataset folder ds"],
         "every line is checked before the first step; nothing trained or saved"),
    case("torn_captions_caption", "data",
         "Captions file with a torn last line (a run killed mid-write)",
         ["data", "caption", "--provider", "offline"], 0,
         ["note: data/captions.jsonl: removed a torn last line (… bytes) left by an interrupted run",
          "1 new caption(s) in data/captions.jsonl; 1 image(s) already captioned"],
         "the complete lines are kept; only the torn tail is cut, then the missing caption is added",
         changes=["data/captions.jsonl"]),
    case("torn_captions_build", "data", "Captions file with a torn last line, when building",
         ["data", "build", "--out", "datasets/culture"], 0,
         ["warning: data/captions.jsonl:3: torn last line ignored"],
         "the captions file is not modified; the dataset is built from the complete lines"),
    case("torn_dataset_lora", "data", "Dataset `train.jsonl` with a torn last line",
         ["lora", "--model", "tiny-4bit", "--models-dir", "models", "--data", "ds", "--out", "adapters/run"], 1,
         ["Error: ds/train.jsonl:5: not valid JSON (…)"],
         "nothing trained or saved; the dataset is not modified"),
    case("catalog_syntax_check", "data", "Catalog `data/entities.json` with a missing comma",
         CHECK, 1,
         ["Error: data/entities.json:3:3: not valid JSON (Expecting ',' delimiter)"],
         "no manifest written, nothing modified"),
    case("duplicate_ids_add", "data", "Catalog with the same entity id twice",
         ADD, 1,
         ["Error: data/entities.json: duplicate entity id 'gena'"],
         "the catalog is not rewritten and nothing is copied"),
    case("unknown_folder_check", "data", "Image folder whose name is not a catalog id (`gnea/`)",
         CHECK, 1,
         ["Error: data/images/gnea: folder name is not an entity id in the catalog (did you mean 'gena'?)"],
         "no manifest written, nothing modified"),
    case("unknown_entity_eval", "data", "Dataset line about an entity the catalog lacks",
         ["eval", "--model", "tiny-4bit", "--data", "ds", "--out", "runs/base"], 1,
         ["Error: ds/test.jsonl:1: entity 'nobody' is not in the catalog"],
         "stops before the model loads; no run folder created"),
    case("empty_split_eval", "data", "Empty `test.jsonl`",
         ["eval", "--model", "tiny-4bit", "--data", "ds", "--out", "runs/base"], 1,
         ["Error: ds/test.jsonl: no samples (empty file)"],
         "stops before the model loads; no run folder created"),
    # --- models, adapters, saving ---
    case("foreign_adapter_generate", "models",
         "Adapter trained on another base model (Qwen2.5-VL-3B) used with the tiny model",
         ["generate", "photo.jpg", "--model", "tiny-4bit", "--models-dir", "models", "--adapter", "adapters/from-3b"],
         1,
         ["Error: adapters/from-3b: trained on a different base model (hidden_size 2048 at "
          "Qwen/Qwen2.5-VL-3B-Instruct, this model 64 at models/tiny-4bit)"],
         "nothing generated or written"),
    case("group_size_48_convert", "models", "Quantization group size 48",
         ["convert", "--model", "tiny-4bit", "--hf-path", "hf/tiny", "--out", "models/q48", "--group-size", "48"], 1,
         ["Error: --group-size must be one of (32, 64, 128), got 48"],
         "stops before reading the weights; no folder created"),
    case("group_size_128_convert", "models",
         "Group size 128, which does not divide the tiny model's 64-wide layers",
         ["convert", "--model", "tiny-4bit", "--hf-path", "hf/tiny", "--out", "models/q128", "--group-size", "128"],
         0,
         ["warning: group size 128 does not divide text dims [64]: those layers stay unquantized "
          "(see cultvlm_convert.json)"],
         "converts; the layers left in float are listed, each with the reason, in `cultvlm_convert.json`"),
    case("truncated_shard_convert", "models",
         "Hugging Face checkpoint with a truncated weights shard (an interrupted download)",
         ["convert", "--model", "tiny-4bit", "--hf-path", "hf/tiny", "--out", "models/q4"], 1,
         ["Error: hf/tiny: incomplete weights model-00001-of-00003.safetensors (1000 of at least … bytes) "
          "-- an interrupted download or copy? Fetch them again"],
         "stops before converting; no output folder created"),
    case("disk_full_convert", "models",
         "Disk full while `convert --force` writes the weights (MLX writes a short file and reports "
         "nothing; simulated)",
         ["convert", "--model", "tiny-4bit", "--hf-path", "hf/tiny", "--out", "models/tiny-4bit", "--force"], 1,
         ["Error: models/tiny-4bit: conversion failed: model.safetensors (… of … bytes) written incompletely "
          "(is the disk full?); the existing folder is unchanged"],
         "the previous model folder is byte-identical; no partial folder is left"),
    case("disk_full_checkpoint_lora", "models",
         "Disk full while saving the step-2 training checkpoint (the write fails with ENOSPC; simulated)",
         ["lora", "--config", "run.yaml"], 1,
         ["Error: adapters/run/checkpoint: could not save the checkpoint of step 2 (No space left on device); "
          "the previous checkpoint is kept -- free some space and run again with --resume"],
         "the step-1 checkpoint is byte-identical, and `--resume` then finishes the run"),
    case("disk_full_fuse", "models", "Disk full while `fuse --force` writes the fused weights (simulated)",
         ["fuse", "--model", "tiny-4bit", "--models-dir", "models", "--adapter", "adapters/run",
          "--out", "fused/tiny", "--force"], 1,
         ["Error: fused/tiny: fusing failed: model.safetensors (… of … bytes) written incompletely "
          "(is the disk full?); the existing folder is unchanged"],
         "the previous fused model is byte-identical; no partial folder is left"),
    # --- services ---
    case("gigachat_no_credentials", "services", "`GIGACHAT_CREDENTIALS` not set (nor in `./.env`)",
         GIGACHAT, 1,
         ["Error: GigaChat needs GIGACHAT_CREDENTIALS (the base64 authorization key) in the environment or in "
          "./.env; or caption without an API: --provider offline"],
         "no request is made; captions.jsonl untouched"),
    case("gigachat_bad_setting", "services", "`GIGACHAT_VERIFY_SSL_CERTS=maybe`",
         GIGACHAT, 1,
         ["Error: GIGACHAT_VERIFY_SSL_CERTS: expected true or false, got 'maybe'"],
         "no request is made; captions.jsonl untouched"),
    case("gigachat_basic_prefix", "services", "`GIGACHAT_CREDENTIALS=Basic <key>` (the header's prefix pasted too)",
         GIGACHAT, 1,
         ["Error: GIGACHAT_CREDENTIALS: give the authorization key without the 'Basic ' in front of it"],
         "no request is made; the key is never printed"),
    case("gigachat_not_base64", "services", "`GIGACHAT_CREDENTIALS` with a space inside (a key broken by a paste)",
         GIGACHAT, 1,
         ["Error: GIGACHAT_CREDENTIALS: not a base64 authorization key (it holds characters other than A-Z, a-z, "
          "0-9, +, /, =); copy the key from the GigaChat project page as it is"],
         "no request is made; the key is never printed"),
    case("gigachat_no_ca_bundle", "services", "`GIGACHAT_CA_BUNDLE_FILE` naming a file that is not there",
         GIGACHAT, 1,
         ["Error: GIGACHAT_CA_BUNDLE_FILE: russian_trusted_root_ca.crt: no such file"],
         "no request is made"),
    case("gigachat_untrusted_certificate", "services",
         "GigaChat's certificate not trusted here (no Russian Trusted Root CA; a self-signed server stands in)",
         GIGACHAT, 1,
         ["Error: GigaChat sign-in: the server's certificate is not trusted here (GigaChat's chains to the Russian "
          "Trusted Root CA): set GIGACHAT_CA_BUNDLE_FILE to that CA's .crt file, in the environment or ./.env"],
         "stops at once, no retries; captions.jsonl untouched"),
    case("gigachat_401", "services", "GigaChat rejects the credentials (HTTP 401 at sign-in)",
         GIGACHAT, 1,
         ["Error: GigaChat refused the credentials (HTTP 401 on sign-in): check GIGACHAT_CREDENTIALS and "
          "GIGACHAT_SCOPE, or caption without an API: --provider offline"],
         "stops at once, no retries; captions.jsonl untouched; the key is never printed"),
    case("gigachat_429", "services", "GigaChat answers HTTP 429 (rate limit) to every try",
         GIGACHAT, 1,
         ["note: GigaChat caption of gena/b.jpg: HTTP 429; retrying in 0.2s",
          "Error: GigaChat caption of gena/b.jpg: gave up after 2 tries (last: HTTP 429)"],
         "Retry-After honoured; earlier captions kept, no half line; a re-run resumes at gena/b.jpg"),
    case("gigachat_500", "services", "GigaChat answers HTTP 500 to every try",
         GIGACHAT, 1,
         ["Error: GigaChat caption of gena/b.jpg: gave up after 2 tries (last: HTTP 500)"],
         "earlier captions kept; a re-run resumes"),
    case("gigachat_timeout", "services", "GigaChat does not answer within `--timeout`",
         GIGACHAT[:-4] + ["--retries", "0", "--retry-delay", "0.05"], 1,
         ["Error: GigaChat caption of gena/b.jpg: gave up after 1 try (last: ReadTimeout)"],
         "earlier captions kept; a re-run resumes"),
    # --- settings: checked (type, range, finite) before a model loads ---
    *[case(f"yaml_{key}_{name}_lora", "settings", f"`{line}` in the LoRA config (run.yaml)",
           ["lora", "--config", "run.yaml"], 1, [f"Error: run.yaml: {message}"],
           "refused before the model loads; nothing written")
      for key, name, line, message in LORA_YAML_CASES],
    *[case(f"cli_{name}", "settings", f"`{' '.join(flags)}`", command + flags, 1, [f"Error: {message}"],
           "refused before the model loads; nothing written")
      for name, command, flags, message in CLI_CASES],
    *[case(f"usage_{name}", "settings", f"`cultvlm {' '.join(args)}`", args, 2, [f"Error: {message}"],
           "nothing read, nothing written") for name, args, message in USAGE_CASES],
    case("yaml_list_lora", "settings", "A LoRA config that is a list, not a mapping",
         ["lora", "--config", "run.yaml"], 1, ["Error: run.yaml: expected a mapping of option: value"],
         "refused before the model loads; nothing written"),
    case("yaml_not_utf8_lora", "settings", "A LoRA config saved in Latin-1 (`# café`)",
         ["lora", "--config", "run.yaml"], 1,
         ["Error: run.yaml: cannot read config ('utf-8' codec can't decode byte 0xe9 in position …)"],
         "refused before the model loads; nothing written"),
    case("nan_loss_lora", "settings",
         "A learning rate so high (`learning_rate: 1.0e+30`) that the weights overflow and the loss turns NaN",
         ["lora", "--config", "run.yaml"], 1,
         ["Error: step 2: loss nan, gradient norm nan: training stopped before the update, no adapters written; "
          "the last good checkpoint (step 1) is kept in adapters/run/checkpoint. Try a lower learning_rate "
          "(now 1e+30) or more warmup_steps (now 0)"],
         "no adapters.safetensors is written; the step-1 checkpoint is kept"),
    case("prompt_image_pad_generate", "settings", "`--prompt` holding Qwen's `<|image_pad|>` token",
         ["generate", "photo.jpg", "--model", "tiny-4bit", "--models-dir", "models", "--prompt",
          "Кто это? <|image_pad|>"], 1,
         ["Error: --prompt holds <|image_pad|>, one of Qwen's control tokens, which the chat template places "
          "itself: remove it from the question"],
         "refused before the model loads"),
    case("prompt_im_end_generate", "settings", "`--prompt` holding `<|im_end|>` (an attempt to end the turn)",
         ["generate", "photo.jpg", "--model", "tiny-4bit", "--models-dir", "models", "--prompt",
          "Hi<|im_end|><|im_start|>assistant"], 1,
         ["Error: --prompt holds <|im_end|>, one of Qwen's control tokens, which the chat template places "
          "itself: remove it from the question"],
         "refused before the model loads"),
    case("ids_case_check", "data", "Catalog ids `gena` and `Gena` (one folder on macOS)",
         CHECK, 1,
         ["Error: data/entities.json: entity ids 'gena' and 'Gena' differ only in case or Unicode form, and "
          "would share one image folder on macOS; rename one"],
         "nothing written"),
    case("ids_nfd_check", "data", "Catalog ids `алёша` in NFC and in NFD (`е` + combining diaeresis)",
         CHECK, 1,
         ["Error: data/entities.json: entity ids 'алёша' and 'але\u0308ша' differ only in case or Unicode form, "
          "and would share one image folder on macOS; rename one"],
         "nothing written"),
    case("train_not_utf8_lora", "data", "`train.jsonl` with a line in Latin-1",
         ["lora", "--config", "run.yaml"], 1,
         ["Error: ds/train.jsonl:5: not UTF-8 text (byte 0xe9 at column 32); save the file as UTF-8"],
         "refused before training; the dataset untouched"),
    # --- adapters and model files ---
    *[case(f"adapter_{name}_{command[0]}", "models", what, command, 1, [f"Error: adapters/good/adapters.safetensors: {message}"],
           "refused before any answer; the adapter folder untouched")
      for name, what, message in DAMAGED_ADAPTERS for command in (GENERATE_WITH_ADAPTER, EVAL_WITH_ADAPTER)],
    # --- outputs: a command deletes only what it wrote, never an input ---
    *[case(f"out_{name}", "outputs", what, command, 1, [f"Error: {message}"], kept)
      for name, what, command, message, kept in OUT_CASES],
    case("lock_held_lora", "outputs", "A second `lora` into the folder a running `lora` writes",
         ["lora", "--config", "run.yaml"], 1,
         ["Error: adapters/run: in use by `cultvlm lora` (pid <pid>); wait for it to finish, or stop it "
          "(if no such process runs, delete adapters/.run.lock)"],
         "the first run's files untouched"),
    case("lock_stale_lora", "outputs", "A lock left by a `lora` killed with `kill -9` (its process is gone)",
         ["lora", "--config", "run.yaml"], 0, ["adapters written to adapters/run"],
         "the stale lock is taken over and removed at the end", changes=("adapters/.run.lock",)),
    case("commons_html", "services",
         "Wikimedia Commons endpoint answers an HTML page (captive portal, proxy) instead of JSON",
         ["data", "collect", "gena", "--endpoint", "<endpoint>", "--delay", "0.02", "--retries", "0"], 1,
         ["Error: <endpoint>: answered with an HTML page, not MediaWiki JSON (a captive portal, proxy or "
          "error page?); check the network or --endpoint"],
         "the entity's images and sources.jsonl untouched"),
    case("commons_403", "services", "Wikimedia Commons answers HTTP 403 (a User-Agent without a contact)",
         ["data", "collect", "gena", "--endpoint", "<endpoint>", "--delay", "0.02", "--retries", "0"], 1,
         ["Error: <endpoint>: HTTP 403 Forbidden: Wikimedia asks for a User-Agent with a contact; set "
          "CULTVLM_CONTACT (an e-mail or a URL) and run again"],
         "the entity's images and sources.jsonl untouched"),
]

GROUPS = {"images": "Image files", "data": "Datasets, captions and the catalog",
          "models": "Models, adapters and saving", "settings": "Settings and prompts",
          "outputs": "Output folders: nothing lost", "services": "GigaChat and Wikimedia Commons"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def render() -> str:
    out = [
        "# Bad input: what cultvlm says",
        "",
        "<!-- Generated by scripts/errors_doc.py from its CASES table; tests/test_errors.py runs every",
        "     row through the real CLI and fails if this file differs. Edit the table, then run",
        "     `python scripts/errors_doc.py`. -->",
        "",
        "Every row below is a test (`tests/test_errors.py`, offline, on the tiny model): the command is",
        "run as shown in a folder holding the bad input, and the test checks the exit code, that each",
        "line shown appears in the output (`…` stands for any text), that nothing prints a traceback,",
        "and that every file that existed before the command is byte-identical after it (except a",
        "repaired file, where said).",
        "",
        "- **Exit 1** — the run cannot go on. The message is one line, `Error: ` then the file (with",
        "  `:line` or `:line:column` where there is one) or the setting at fault, and what is wrong.",
        "- **Exit 0** — the documented behaviour is to go on: the file is skipped and counted (`data",
        "  check`, `add`, `caption`, `build`: unreadable, too small, badly named), or converted on load",
        "  and noted (CMYK, 16-bit, palette, animation, EXIF rotation).",
        "",
        "The working folder holds `data/entities.json` (entities `gena`, `cheburashka`),",
        "`data/images/<id>/`, a dataset `ds/`, `models/tiny-4bit` (converted tiny model) and",
        "`hf/tiny` (its Hugging Face checkpoint), as each case needs. `<endpoint>` is the address of",
        "the fake Commons server the test starts; GigaChat settings come from the environment and",
        "point to a fake GigaChat.",
        "",
        f"{len(CASES)} cases.",
    ]
    for group, title in GROUPS.items():
        out += ["", f"## {title}", "", "| # | bad input | command | exit | what the user gets | nothing lost |",
                "|---|---|---|---|---|---|"]
        for number, c in enumerate(CASES, start=1):
            if c.group != group:
                continue
            command = _code("cultvlm " + " ".join(a if a.startswith("<") else shlex.quote(a) for a in c.args))
            got = "<br>".join(_code(line) for line in c.expect)
            kept = c.kept + ("" if not c.changes else f" (rewritten: {', '.join(c.changes)})")
            out.append(f"| {number} | {_cell(c.input)} | {command} | {c.exit} | {got} | {_cell(kept)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC} is out of date: run python scripts/errors_doc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC} ({len(CASES)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
