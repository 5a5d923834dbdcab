"""`cultvlm eval` on the tiny model: batched = one-by-one, base vs tuned, resume, bad input."""

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

import mlx_cultvlm.evaluate as evaluate_module
import mlx_cultvlm.generate as generate_module
from conftest import PIXELS
from mlx_cultvlm.cli import main
from mlx_cultvlm.data.catalog import load_catalog
from mlx_cultvlm.errors import CultvlmError
from mlx_cultvlm.data.questions import EVAL_QUESTIONS, training_phrasings
from mlx_cultvlm.evaluate import cpu_cores, evaluate, generate_answers, items_from_dataset
from mlx_cultvlm.generate import stream_answer
from mlx_cultvlm.vlm import float32_language_model_on_cpu, load_model

CATALOG = str(Path(__file__).resolve().parent.parent / "data" / "entities.json")


def run_eval(model, out, data, **kw):
    options = dict(catalog_path=CATALOG, max_tokens=16, max_pixels=PIXELS, progress=False)
    return evaluate(str(model), out, data=str(data), **(options | kw))


def predictions(out):
    return {p["item_id"]: p for p in map(json.loads, (Path(out) / "predictions.jsonl").read_text().splitlines())}


def probe_keys(entity) -> set[str]:
    """The questions one picture of `entity` is asked (see evaluate's docstring)."""
    keys = {"naming_ru", "naming_en", "verify_yes:ru", "verify_yes:en", "verify_no:popular", "verify_no:random",
            "describe"}
    if entity.origin.get("work") or entity.origin.get("author"):
        keys |= {"fact:ru", "fact:en"}
    return keys | ({"verify_no:adversarial"} if entity.confusable_with else set())


def test_probe_set_is_fixed_and_complete(dataset):
    root, items = dataset
    catalog = load_catalog(CATALOG)
    probe = items_from_dataset(root, "test", catalog)
    assert probe == items_from_dataset(root, "test", catalog)  # the same items every time
    by_picture = {}
    for p in probe:
        by_picture.setdefault(p["sha256"], []).append(p)
    assert len(by_picture) == len(items["test"])
    for asked in by_picture.values():
        entity = catalog[asked[0]["entity"]]
        assert {p["item_id"].split(":", 1)[1] for p in asked} == probe_keys(entity)
        no = [p for p in asked if p["kind"] == "verify_no"]
        assert len({p["asked_about"] for p in no}) == len(no) and entity.id not in {p["asked_about"] for p in no}
        assert {p["lang"] for p in asked if p["kind"] in ("fact", "verify_yes")} == {"ru", "en"}
    cheb = next(p for p in probe if p["entity"] == "cheburashka" and p["negative"] == "adversarial")
    assert cheb["asked_about"] == "mickey_mouse" and ("Микки Маус" if cheb["lang"] == "ru" else "Mickey Mouse") in cheb["prompt"]
    # Held-out wording: no question is a training phrasing; both phrasings of each kind are used.
    trained = training_phrasings()
    assert not {p["prompt"] for p in probe} & {q.format(name=e.name(lang)) for q in trained
                                              for e in catalog.values() for lang in ("ru", "en")}
    naming = {p["prompt"] for p in probe if p["kind"] == "naming_ru"}
    assert naming == set(EVAL_QUESTIONS["naming"]["ru"])


def test_no_evaluation_phrasing_is_a_training_phrasing():
    assert all(len(EVAL_QUESTIONS[kind][lang]) >= 2 for kind in EVAL_QUESTIONS for lang in ("ru", "en"))
    asked = {q for kind in EVAL_QUESTIONS.values() for questions in kind.values() for q in questions}
    assert not asked & training_phrasings()


def test_popular_negatives_are_the_entities_with_most_training_pictures(dataset):
    from mlx_cultvlm.evaluate import popularity

    root, _ = dataset
    catalog = load_catalog(CATALOG)
    order = popularity(root, catalog)
    # The synthetic set has 8 training pictures of each of its four entities, none of the rest.
    assert order[:4] == [e for e in catalog if e in {"cheburashka", "kolobok", "pikachu", "shapoklyak"}]
    probe = items_from_dataset(root, "test", catalog)
    assert {p["asked_about"] for p in probe if p["negative"] == "popular"} <= set(order[:3])


@pytest.mark.parametrize("cores", [1, 3])
def test_batched_answers_equal_one_by_one(tiny_4bit, dataset, monkeypatch, cores):
    """Whether the batch runs whole or shared out among CPU cores (one stream each, side by side), and with
    the language model in float32 as `cultvlm eval` runs it on the CPU."""
    root, _ = dataset
    probe = items_from_dataset(root, "test", load_catalog(CATALOG))[::4][:15]
    assert len({p["image"] for p in probe}) >= cores
    model, processor = load_model(str(tiny_4bit))  # random weights: long, fragile answers
    float32_language_model_on_cpu(model)
    assert model.language_model.model.layers[0].mlp.gate_proj.scales.dtype == mx.float32  # was bfloat16
    assert model.vision_tower.patch_embed.proj.weight.dtype == mx.bfloat16  # unquantized: left as it is
    monkeypatch.setattr(evaluate_module, "cpu_cores", lambda: cores)
    batched = generate_answers(model, processor, probe, 24, 3136, PIXELS)
    one_by_one = ["".join(stream_answer(model, processor, p["image"], p["prompt"], max_tokens=24,
                                        max_pixels=PIXELS)).strip() for p in probe]
    assert batched == one_by_one
    assert len(set(batched)) > 1
    assert generate_answers(model, processor, [], 24, 3136, PIXELS) == []


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="counts native threads in /proc")
def test_batches_reuse_their_streams(tiny_4bit, dataset, monkeypatch):
    """Every new MLX stream starts a worker thread that outlives its use, so batches shared out
    among cores must reuse their streams: the process's native threads do not pile up."""
    def native_threads():
        return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("Threads:")))

    root, _ = dataset
    probe = items_from_dataset(root, "test", load_catalog(CATALOG))[::5][:10]
    model, processor = load_model(str(tiny_4bit))
    monkeypatch.setattr(evaluate_module, "cpu_cores", lambda: 2)
    generate_answers(model, processor, probe, 2, 3136, PIXELS)
    before = native_threads()
    for _ in range(4):
        generate_answers(model, processor, probe, 2, 3136, PIXELS)
    assert native_threads() == before


def test_a_process_that_shared_out_a_batch_exits_cleanly(tiny_4bit, dataset):
    """MLX 0.32 aborts at exit ("terminate called without an active exception") in most runs of
    a process that used it from a second thread; the streams run side by side from one thread."""
    import subprocess
    import sys

    root, _ = dataset
    code = f"""
import mlx_cultvlm.evaluate as e
from mlx_cultvlm.data.catalog import load_catalog
from mlx_cultvlm.vlm import load_model
e.let_cpu_streams_overlap()  # as eval runs
e.cpu_cores = lambda: 2
probe = e.items_from_dataset(__import__("pathlib").Path({str(root)!r}), "test", load_catalog({CATALOG!r}))[::5][:10]
model, processor = load_model({str(tiny_4bit)!r})
for _ in range(10):
    answers = e.generate_answers(model, processor, probe, 2, 3136, {PIXELS})
print(len(answers))
"""
    for _ in range(3):  # the abort came in about 7 runs of 10
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert (done.returncode, done.stdout.split()[-1:]) == (0, ["10"]), done.stderr[-2000:]


def test_eval_lets_cpu_streams_overlap_before_it_loads_the_model(tiny_4bit, dataset, tmp_path, monkeypatch):
    """MLX reads MLX_BFS_MAX_WIDTH once, at a process's first evaluation, so eval sets it (on the
    CPU) before the model loads; a width the user set wins."""
    root, _ = dataset
    seen = []

    def loading(*args, **kwargs):
        seen.append(os.environ.get("MLX_BFS_MAX_WIDTH"))
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(evaluate_module, "load_model", loading)
    monkeypatch.delenv("MLX_BFS_MAX_WIDTH", raising=False)
    with pytest.raises(RuntimeError, match="stop before loading"):
        run_eval(tiny_4bit, tmp_path / "default", root)
    monkeypatch.setenv("MLX_BFS_MAX_WIDTH", "7")
    with pytest.raises(RuntimeError, match="stop before loading"):
        run_eval(tiny_4bit, tmp_path / "user", root)
    assert seen == ([str(100 * cpu_cores()), "7"] if mx.default_device() == mx.cpu else [None, "7"])


def test_batch_encodes_each_picture_once_and_matches_one_by_one_as_rows_end(tmp_path, monkeypatch):
    """Every question about four drawn characters, asked the shipped demo base in one batch: the
    vision tower sees each picture once (in one pass per CPU core the pictures are shared out
    to), rows whose answers end early leave the batch, and every answer equals the one-by-one
    path's."""
    from mlx_cultvlm import characters
    from mlx_cultvlm.demo import BASE_DIR, IMAGE_SIZE
    from mlx_cultvlm.evaluate import items_for_image

    (tmp_path / "catalog.json").write_text(json.dumps(characters.DEMO_CATALOG), encoding="utf-8")
    catalog = load_catalog(tmp_path / "catalog.json")
    drawn = characters.write_images(tmp_path, ids=["mickey_mouse", "pikachu", "kolobok", "shapoklyak"],
                                    per_entity=1, seed=3, size=IMAGE_SIZE)
    probe = [i for k, (entity, paths) in enumerate(drawn.items())
             for i in items_for_image(str(paths[0]), f"{k:064x}", catalog[entity], catalog)]
    model, processor = load_model(str(BASE_DIR))
    encoded = []
    real_features = generate_module.image_features
    monkeypatch.setattr(generate_module, "image_features",
                        lambda m, pixels, grid: encoded.append(grid.shape[0]) or real_features(m, pixels, grid))
    batched = generate_answers(model, processor, probe, 24, 3136, IMAGE_SIZE ** 2)
    assert sum(encoded) == 4 and len(encoded) == min(4, cpu_cores())
    assert len(probe) > 4
    one_by_one = ["".join(stream_answer(model, processor, p["image"], p["prompt"], max_tokens=24,
                                        max_pixels=IMAGE_SIZE ** 2)).strip() for p in probe]
    assert batched == one_by_one
    lengths = [len(processor.tokenizer.encode(a, add_special_tokens=False)) for a in one_by_one]
    assert min(lengths) < max(lengths) < 24  # rows ended, at different steps



def test_reference_pictures_come_before_the_question_and_match_one_by_one(tiny_4bit, dataset, tmp_path, monkeypatch):
    """The reference-pictures baseline: one training picture per entity (catalog order, never a
    test picture), labelled, before each question's picture. The references go through the
    vision tower once per batch (one per CPU core); answers equal mlx-vlm's one-by-one generation with the same
    pictures and prompt; run.json records them, so another choice of references is another run."""
    from mlx_cultvlm.evaluate import reference_pictures

    root, items = dataset
    catalog = load_catalog(CATALOG)
    references = reference_pictures(root, catalog)
    assert [label for _, label in references] == [
        "Чебурашка (Cheburashka)", "Старуха Шапокляк (Old Lady Shapoklyak)", "Колобок (Kolobok)", "Пикачу (Pikachu)"]
    train = {path.resolve(): name for path, name in items["train"]}
    assert all(train[Path(path).resolve()] in label for path, label in references)  # training pictures

    probe = items_from_dataset(root, "test", catalog)[::5][:10]
    model, processor = load_model(str(tiny_4bit))
    encoded = []
    real_features = generate_module.image_features
    monkeypatch.setattr(generate_module, "image_features",
                        lambda m, pixels, grid: encoded.append(grid.shape[0]) or real_features(m, pixels, grid))
    batched = generate_answers(model, processor, probe, 24, 3136, PIXELS, references)
    pictures = len({p["image"] for p in probe})
    workers = min(pictures, cpu_cores())  # each one's batch shows the references once
    assert len(encoded) == workers and sum(encoded) == workers * len(references) + pictures
    one_by_one = ["".join(stream_answer(model, processor, p["image"], p["prompt"], max_tokens=24, max_pixels=PIXELS,
                                        references=references)).strip() for p in probe]
    assert batched == one_by_one
    assert batched != generate_answers(model, processor, probe, 24, 3136, PIXELS)  # the references matter

    run_eval(tiny_4bit, tmp_path / "refs", root, references=references)
    assert json.loads((tmp_path / "refs" / "run.json").read_text())["references"] == references
    with pytest.raises(CultvlmError, match="other settings \\(references\\)"):
        run_eval(tiny_4bit, tmp_path / "refs", root, references=references[:2])


def test_base_versus_tuned(tiny_4bit, trained, dataset, tmp_path):
    root, items = dataset
    base = run_eval(tiny_4bit, tmp_path / "base", root)
    tuned = run_eval(tiny_4bit, tmp_path / "tuned", root, adapter=str(trained.out), baseline=str(tmp_path / "base"))
    assert len(predictions(tmp_path / "tuned")) == len(items_from_dataset(root, "test", load_catalog(CATALOG)))
    first = predictions(tmp_path / "tuned")
    line = next(p for p in first.values() if p["kind"] == "naming_ru")
    assert {"item_id", "prompt", "answer", "named", "yes_no", "correct", "entity"} <= set(line)
    run = json.loads((tmp_path / "tuned" / "run.json").read_text())
    assert run["adapter"] == str(trained.out) and run["max_tokens"] == 16 and run["finished_at"]
    assert json.loads((tmp_path / "tuned" / "metrics.json").read_text()) == tuned
    # The tuned model names the held-out images it was trained to name (in Russian, the
    # language it was taught); the random base does not.
    right = sum(p["correct"] for p in first.values() if p["kind"] == "naming_ru")
    base_right = sum(p["correct"] for p in predictions(tmp_path / "base").values() if p["kind"] == "naming_ru")
    print(f"\nnaming_ru on {len(items['test'])} held-out images: base {base_right}, tuned {right}")
    assert right >= 12 and base_right <= 2
    assert base and tuned

    # The report of the two runs: a page with its figures, numbers equal to the runs' metrics.
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "base"), str(tmp_path / "tuned"),
                                       "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<img" in page and (tmp_path / "report" / "naming_accuracy.png").stat().st_size > 1000
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["runs"]["tuned"]["metrics"]["overall"]["naming_ru"]["k"] == right  # one answer a picture


def test_resume_redoes_nothing_finished(tiny_4bit, dataset, tmp_path, monkeypatch):
    root, _ = dataset
    run_eval(tiny_4bit, tmp_path / "whole", root, batch_size=8)
    whole = predictions(tmp_path / "whole")
    # A run killed after 3 batches, in the middle of writing a line.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    lines = (cut / "predictions.jsonl").read_text().splitlines(keepends=True)
    (cut / "predictions.jsonl").write_text("".join(lines[:24]) + lines[24][:30])
    asked = []
    real = evaluate_module.generate_answers

    def counting(model, processor, items, *args):
        asked.extend(i["item_id"] for i in items)
        return real(model, processor, items, *args)

    monkeypatch.setattr(evaluate_module, "generate_answers", counting)
    run_eval(tiny_4bit, cut, root, batch_size=8)
    done_before = {json.loads(x)["item_id"] for x in lines[:24]}
    assert len(asked) == len(whole) - 24 and not done_before & set(asked)
    assert predictions(cut) == whole


def test_bad_input(tiny_4bit, trained, dataset, tmp_path):
    root, _ = dataset
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "test.jsonl").write_text("")
    with pytest.raises(CultvlmError, match="test.jsonl: no samples"):
        run_eval(tiny_4bit, tmp_path / "r1", empty)
    stranger = tmp_path / "stranger"
    shutil.copytree(root, stranger)
    line = json.loads((stranger / "test.jsonl").read_text().splitlines()[0])
    line["meta"]["entity"] = "gena_the_crocodile"
    (stranger / "test.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(CultvlmError, match="test.jsonl:1: entity 'gena_the_crocodile' is not in the catalog"):
        run_eval(tiny_4bit, tmp_path / "r2", stranger)
    run_eval(tiny_4bit, tmp_path / "r3", root, max_tokens=4)
    with pytest.raises(CultvlmError, match="holds a run with other settings.*max_tokens"):
        run_eval(tiny_4bit, tmp_path / "r3", root, max_tokens=5)
    result = CliRunner().invoke(main, ["eval", "--model", str(tiny_4bit), "--out", str(tmp_path / "r4")])
    assert result.exit_code == 1 and "exactly one of --data" in result.output


def test_probe_a_folder_through_the_cli(tiny_4bit, dataset, tmp_path):
    root, _ = dataset
    folder = tmp_path / "probe" / "cheburashka"
    folder.mkdir(parents=True)
    for p in sorted((root / "images" / "test").glob("0_*.png")):
        shutil.copy(p, folder / p.name)
    result = CliRunner().invoke(main, ["eval", "--model", str(tiny_4bit), "--images", str(tmp_path / "probe"),
                                       "--out", str(tmp_path / "run"), "--catalog", CATALOG,
                                       "--max-tokens", "4", "--max-pixels", str(PIXELS)])
    assert result.exit_code == 0, result.output
    kinds = {p["kind"] for p in predictions(tmp_path / "run").values()}
    assert kinds == {"naming_ru", "naming_en"}
    # The command prints the pooled naming figure that metrics.json holds.
    from mlx_cultvlm.metrics import naming

    targets = naming(json.loads((tmp_path / "run" / "metrics.json").read_text()), "target")
    assert (targets["n"], targets["items"]) == (len(predictions(tmp_path / "run")) // 2, len(predictions(tmp_path / "run")))
    assert f"  targets: {targets['k']}/{targets['n']} = " in result.output
    assert "controls:" not in result.output  # no control was asked about


def test_an_adapter_retrained_in_place_makes_the_old_answers_stale(tiny_4bit, trained, dataset, tmp_path):
    root, _ = dataset
    probe = tmp_path / "probe" / "cheburashka"
    probe.mkdir(parents=True)
    shutil.copy(next((root / "images" / "test").glob("0_*.png")), probe)
    adapter = tmp_path / "adapter"
    shutil.copytree(trained.out, adapter)
    options = dict(images=str(tmp_path / "probe"), adapter=str(adapter), catalog_path=CATALOG, max_tokens=4,
                   max_pixels=PIXELS, progress=False)
    evaluate(str(tiny_4bit), tmp_path / "run", **options)
    evaluate(str(tiny_4bit), tmp_path / "run", **options)  # same weights: resumes, nothing to redo
    weights = adapter / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes())  # "retrained": rewritten in place
    with pytest.raises(CultvlmError, match="other settings \\(weights\\)"):
        evaluate(str(tiny_4bit), tmp_path / "run", **options)


def test_eval_refuses_the_pictures_an_adapter_was_trained_on(tiny_4bit, trained, dataset, tmp_path):
    """The adapter records its training pictures; a test split that holds one of them, or a
    mirrored copy, is refused -- or, asked to, left out and counted. The fused model keeps the record."""
    from PIL import Image, ImageOps

    from mlx_cultvlm.data.check import TRAINED_ON
    from mlx_cultvlm.fuse import fuse

    root, items = dataset
    record = json.loads((trained.out / TRAINED_ON).read_text())
    assert len(record["pictures"]) == len(items["train"])
    leaky = tmp_path / "leaky"
    shutil.copytree(root, leaky)
    train_lines = (root / "train.jsonl").read_text().splitlines()
    mirrored = leaky / "images" / "test" / "mirrored.png"
    ImageOps.mirror(Image.open(root / json.loads(train_lines[5])["images"][0])).save(mirrored)
    copy = json.loads((root / "test.jsonl").read_text().splitlines()[0])
    copy["images"], copy["meta"]["sha256"] = ["images/test/mirrored.png"], "f" * 64
    with (leaky / "test.jsonl").open("a") as f:
        f.write(train_lines[0] + "\n" + json.dumps(copy) + "\n")
    options = dict(adapter=str(trained.out), max_tokens=2)
    with pytest.raises(CultvlmError, match=r"2 of the 18 pictures to evaluate were trained on .*--drop-trained"):
        run_eval(tiny_4bit, tmp_path / "refused", leaky, **options)
    assert not (tmp_path / "refused").exists()  # refused before anything was written
    run_eval(tiny_4bit, tmp_path / "dropped", leaky, drop_trained=True, **options)
    run = json.loads((tmp_path / "dropped" / "run.json").read_text())
    assert run["left_out_trained"] == 2 and len({p["sha256"] for p in predictions(tmp_path / "dropped").values()}) == 16
    with pytest.raises(CultvlmError, match="every one of the 32 pictures to evaluate was trained on"):
        run_eval(tiny_4bit, tmp_path / "all", root, split="train", drop_trained=True, **options)

    fused = fuse(str(tiny_4bit), str(trained.out), tmp_path / "fused")
    assert (fused / TRAINED_ON).read_bytes() == (trained.out / TRAINED_ON).read_bytes()
    # ... and its training log, so that a report on the fused model shows the loss curves.
    assert (fused / "train_log.jsonl").read_bytes() == (trained.out / "train_log.jsonl").read_bytes()
    assert json.loads((fused / "cultvlm_fuse.json").read_text())["adapter"] == str(trained.out.resolve())
    with pytest.raises(CultvlmError, match="2 of the 18 pictures"):
        run_eval(fused, tmp_path / "fused-run", leaky, max_tokens=2)
    result = CliRunner().invoke(main, ["eval", "--model", str(fused), "--data", str(leaky), "--out",
                                       str(tmp_path / "cli"), "--catalog", CATALOG, "--max-tokens", "2"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "--drop-trained" in result.output
