"""The whole data path through the CLI on the shipped catalog: add -> check -> caption ->
build -> lora -> generate, with generated pictures and the tiny model."""

import json
import shutil
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from mlx_cultvlm.cli import main
from mlx_cultvlm.samples import read_dataset
from synthetic import CATALOG_IDS as IDS, ENTITIES, draw

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_pictures_to_adapter(tiny_4bit, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    shutil.copy(ROOT / "data" / "entities.json", tmp_path / "data" / "entities.json")
    rng = np.random.default_rng(1)
    for name, shape, colour, background in ENTITIES:
        inbox = tmp_path / "inbox" / IDS[name]
        inbox.mkdir(parents=True)
        for i in range(8):  # one shape on a plain ground: two of them may be near-duplicates
            draw(shape, colour, background, rng, size=112).save(inbox / f"{i}.png")
        run("data", "add", IDS[name], "--images", inbox)
    assert len(list((tmp_path / "data" / "images" / "cheburashka").iterdir())) == 8

    check = json.loads(run("data", "check", "--json", "--min-images", "5"))
    assert check  # the machine-readable report parses
    assert (tmp_path / "data" / "manifest.jsonl").is_file()
    run("data", "caption", "--provider", "offline")
    captions = [json.loads(x) for x in (tmp_path / "data" / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 32 and not any(c["flagged"] for c in captions)
    run("data", "build", "--out", "datasets/synthetic")

    dataset = tmp_path / "datasets" / "synthetic"
    splits = {s: [r for _, r in read_dataset(dataset / f"{s}.jsonl")] for s in ("train", "valid", "test")}
    assert {r["meta"]["kind"] for r in splits["train"]} >= {"naming", "fact", "describe", "verify_yes", "verify_no", "replay"}
    train_images = {r["meta"]["sha256"] for r in splits["train"]}
    assert not train_images & {r["meta"]["sha256"] for r in splits["test"]}
    assert (dataset / "README.md").is_file()

    run("lora", "--model", tiny_4bit, "--data", dataset, "--out", "adapters/synthetic", "--steps", "2",
        "--max-pixels", 112 * 112, "--rank", "4")
    assert (tmp_path / "adapters" / "synthetic" / "adapters.safetensors").is_file()
    test_image = dataset / splits["test"][0]["images"][0]
    assert run("generate", test_image, "--model", tiny_4bit, "--adapter", "adapters/synthetic",
               "--max-tokens", "4", "--max-pixels", 112 * 112).strip()
