"""`cultvlm eval`: ask a model a fixed set of questions about held-out images and score them.

Every picture gets the same probe set, so base and tuned models answer exactly the same items.
Each question is one of at least two held-out phrasings that no training line uses
(data/questions.py), picked by the picture's hash:

    naming_ru, naming_en   who is this?                  right if it names the entity, and only it
    fact (ru, en)          who is it, from which work, by whom?
                                                         right if it names the entity and its work or author
    verify_yes (ru, en)    "Is this <entity>?"           right if the answer is yes
    verify_no              "Is this <other>?", asked about three others (POPE's settings):
                           adversarial (a look-alike: the first `confusable_with`), popular (the
                           entity with the most training pictures), random (by the picture's hash)
                                                         right if the answer is no
    describe               describe the picture          right if it names no entity but the pictured one

Out-of-catalog pictures (a dataset's negatives, role "negative") are asked the naming questions
(right: no catalog name), verify_no about a popular and a random target, and describe. How an
answer is read is `score.AnswerScorer` (a hedge between names names none).

Decoding is greedy, with a pinned pixel budget and a fixed max-token count (recorded in run.json).
Answers are generated in batches (`generate.answer_steps`: each picture encoded once for all
its questions, left padding) and appended to predictions.jsonl as each batch finishes, so a killed run resumes
without redoing finished items.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import click
import mlx.core as mx
from PIL import Image
from tqdm import tqdm

from .data.catalog import LANGS, ORIGIN_KEYS, Entity, load_catalog
from .data.check import read_training_record, trained_on
from .data.questions import EVAL_QUESTIONS
from .errors import CultvlmError
from .files import (NOT_UTF8, append_jsonl, check_out_apart, output_lock, printable, read_jsonl, remove_own,
                    utf8_name, write_json)
from .generate import answer_steps, check_decoding, run_side_by_side
from .images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, fit_to_budget, grid_size, load_image
from .metrics import compute_metrics
from .models import resolve_model
from .samples import read_dataset, resolve_image
from .score import AnswerScorer
from .vlm import float32_language_model_on_cpu, load_model

PROBE_KINDS = ("naming_ru", "naming_en")  # --images: the entity may be unknown
NEGATIVE_SETTINGS = ("adversarial", "popular", "random")  # POPE's, for verify_no
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}


def _pick(sha256: str, salt: str, options: list):
    """One of `options`, the same for a picture every run."""
    return options[int(hashlib.sha256(f"{salt}:{sha256}".encode()).hexdigest()[:8], 16) % len(options)]


def asked_entities(entity: Entity | None, sha256: str, catalog: dict[str, Entity],
                   popularity: list[str]) -> dict[str, Entity]:
    """The entities verify_no asks about, by POPE setting: three different ones, none of them
    the pictured entity. An out-of-catalog picture is asked about targets, and has no look-alike."""
    pool = [e for e in catalog.values() if entity is not None or e.role == "target"]
    taken = {entity.id} if entity else set()
    asked = {}
    if entity and entity.confusable_with:
        asked["adversarial"] = catalog[entity.confusable_with[0]]
    taken |= {e.id for e in asked.values()}
    popular = next((e for e in popularity if e not in taken and catalog[e] in pool), None)
    if popular:
        asked["popular"] = catalog[popular]
        taken.add(popular)
    rest = sorted(e.id for e in pool if e.id not in taken)
    if rest:
        asked["random"] = catalog[_pick(sha256, "random", rest)]
    return asked


def items_for_image(image: str, sha256: str, entity: Entity | None, catalog: dict[str, Entity],
                    popularity: list[str] = (), negative: bool = False, kinds=None) -> list[dict]:
    """The probe set of one picture: of `entity`, of no catalog entity (`negative`), or of an
    unknown one (entity None: the naming questions only)."""
    role = "negative" if negative else entity.role if entity else None

    def item(kind: str, lang: str, key: str, asked: Entity | None = None, setting: str | None = None) -> dict:
        question = _pick(sha256, key, EVAL_QUESTIONS[kind.split("_")[0]][lang])
        return {"item_id": f"{sha256[:16]}:{key}", "image": image, "sha256": sha256,
                "entity": entity.id if entity else None, "role": role, "kind": kind, "lang": lang,
                "negative": setting, "asked_about": asked.id if asked else None,
                "prompt": question.format(name=asked.name(lang)) if asked else question}

    items = [item(f"naming_{lang}", lang, f"naming_{lang}") for lang in LANGS]
    if kinds is not None or (entity is None and not negative):
        return [i for i in items if kinds is None or i["kind"] in kinds]
    if entity is not None:
        if any(entity.origin.get(k) for k in ORIGIN_KEYS):
            items += [item("fact", lang, f"fact:{lang}") for lang in LANGS]
        items += [item("verify_yes", lang, f"verify_yes:{lang}", entity) for lang in LANGS]
    for setting, asked in asked_entities(entity, sha256, catalog, popularity).items():
        items.append(item("verify_no", _pick(sha256, setting, list(LANGS)), f"verify_no:{setting}", asked, setting))
    items.append(item("describe", _pick(sha256, "describe", list(LANGS)), "describe"))
    return items


def dataset_pictures(data: Path, split: str, catalog: dict[str, Entity]) -> dict[str, tuple[str, str | None]]:
    """sha256 -> (image path, entity id) of each distinct image of the split (a dataset line's
    meta names its entity; an out-of-catalog picture, meta.role "negative", has entity None)."""
    path = data / f"{split}.jsonl"
    images: dict[str, tuple[str, str | None]] = {}
    for lineno, record in read_dataset(path):
        meta, where = record.get("meta") or {}, f"{path}:{lineno}"
        if not record.get("images") or "entity" not in meta:
            raise CultvlmError(f"{where}: needs an image and meta.entity to be evaluated")
        if meta["entity"] is None and meta.get("role") != "negative":
            raise CultvlmError(f"{where}: meta.entity is null but meta.role is not \"negative\"")
        if meta["entity"] is not None and meta["entity"] not in catalog:
            raise CultvlmError(f"{where}: entity {meta['entity']!r} is not in the catalog")
        image = resolve_image(data, record["images"][0], where)
        sha = meta.get("sha256") or _sha256(image)
        images.setdefault(sha, (str(image), meta["entity"]))
    return images


def popularity(data: Path, catalog: dict[str, Entity]) -> list[str]:
    """Catalog ids by how many training pictures they have, most first (ties: catalog order):
    POPE's popular negatives are the entities a model has seen most."""
    counts = Counter(e for _, e in dataset_pictures(data, "train", catalog).values()) if (
        data / "train.jsonl").is_file() else Counter()
    order = list(catalog)
    return sorted(catalog, key=lambda e: (-counts[e], order.index(e)))


def items_from_dataset(data: Path, split: str, catalog: dict[str, Entity]) -> list[dict]:
    """One probe set per distinct image of the split."""
    popular = popularity(data, catalog)
    return [item for sha, (image, entity) in sorted(dataset_pictures(data, split, catalog).items())
            for item in items_for_image(image, sha, catalog.get(entity), catalog, popular, negative=entity is None)]


def reference_pictures(data: Path, catalog: dict[str, Entity], split: str = "train") -> list[list[str]]:
    """[image path, label] of one picture per entity of the split, in catalog order: the first by
    sha256 (a prompting baseline shows them before every question; training pictures, so a
    leak-free dataset never shows a test picture)."""
    first: dict[str, str] = {}
    for sha, (image, entity) in sorted(dataset_pictures(data, split, catalog).items()):
        if entity is not None:
            first.setdefault(entity, image)
    if not first:
        raise CultvlmError(f"{data / f'{split}.jsonl'}: no pictures of catalog entities to show as references")
    return [[first[e], f"{entity.name('ru')} ({entity.name('en')})"] for e, entity in catalog.items() if e in first]


def items_from_folder(folder: Path, catalog: dict[str, Entity]) -> list[dict]:
    """A quick probe of a folder: naming questions; the entity is known when the image sits in
    a sub-folder named after a catalog id."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    for p in [p for p in paths if not utf8_name(p)]:  # could not be written to predictions.jsonl
        click.echo(f"note: skipped {printable(p)}: {NOT_UTF8}", err=True)
        paths.remove(p)
    if not paths:
        raise CultvlmError(f"{folder}: no images")
    return [item for p in paths
            for item in items_for_image(str(p), _sha256(p), catalog.get(p.parent.name), catalog, kinds=PROBE_KINDS)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def score(item: dict, answer: str, scorer) -> dict:
    """The prediction line: the item, the answer, what it was read as, and the verdict."""
    candidates = scorer.candidates(answer)
    line = dict(item, answer=answer, named=scorer.named(answer), candidates=candidates,
                several=len(candidates) > 1,
                target_named=any(scorer.catalog[e].role == "target" for e in candidates),
                yes_no=None, correct=None)
    kind, entity = item["kind"], item["entity"]
    if kind in ("verify_yes", "verify_no"):
        line["yes_no"] = scorer.verify(answer, item["asked_about"])
        line["correct"] = line["yes_no"] == ("yes" if kind == "verify_yes" else "no")
    elif kind == "describe":
        line["mentioned"] = scorer.entities(answer)
        line["correct"] = not set(line["mentioned"]) - {entity}
    elif item["role"] == "negative":
        line["correct"] = not candidates  # naming: no catalog name at all
    elif entity is None:
        return line  # a picture of no known entity (eval --images): nothing to grade
    elif kind == "fact":
        line["correct"] = scorer.fact_correct(answer, entity)
    else:
        line["correct"] = line["named"] == entity
    return line


def generate_answers(model, processor, items: list[dict], max_tokens: int, min_pixels: int,
                     max_pixels: int, references: list[list[str]] = ()) -> list[str]:
    """Greedy answers for a batch of items, one image each (after the [path, label] reference
    pictures, if any); each picture is loaded and encoded once however many of its questions
    the batch holds. On the CPU the pictures are shared out among the cores, one stream and
    batch each, run side by side: MLX runs a CPU stream on one core, and the rows of a batch
    are independent."""
    if not items:
        return []
    pictures = {path: fit_to_budget(load_image(path), min_pixels, max_pixels)
                for path in dict.fromkeys([*(path for path, _ in references), *(item["image"] for item in items)])}
    shown = [(pictures[path], label) for path, label in references]
    distinct = list(dict.fromkeys(item["image"] for item in items))
    workers = picture_workers(len(distinct))
    worker_of = {image: k % workers for k, image in enumerate(distinct)}
    groups = [[k for k, item in enumerate(items) if worker_of[item["image"]] == w] for w in range(workers)]
    jobs = [answer_steps(model, processor, [pictures[items[k]["image"]] for k in group],
                         [items[k]["prompt"] for k in group], max_tokens, shown) for group in groups]
    texts = run_side_by_side(jobs, _cpu_streams(workers) if workers > 1 else None)
    answers = [""] * len(items)
    for group, group_texts in zip(groups, texts):
        for k, text in zip(group, group_texts):
            answers[k] = text.strip()
    return answers


def picture_workers(n_pictures: int) -> int:
    """Streams to share a batch's pictures among: one per core on the CPU; one on a GPU (Metal
    or CUDA), which runs the whole batch at once."""
    return max(1, min(n_pictures, cpu_cores())) if mx.default_device() == mx.cpu else 1


@functools.cache
def _cpu_streams(n: int) -> list:
    """n CPU streams, made once: every new stream starts a worker thread that lives as long as
    the process."""
    return [mx.new_stream(mx.cpu) for _ in range(n)]


def let_cpu_streams_overlap() -> None:
    """On the CPU, let one `mx.eval` over the cores' streams keep them all busy; call it before
    the process evaluates anything (MLX reads the setting once, at its first evaluation). MLX
    lays a graph out breadth-first at most MLX_BFS_MAX_WIDTH arrays wide (default 20) and runs it
    at most ten tasks ahead, so at 20 the streams' graphs come out as long runs of one stream
    while the other cores wait (measured in docs/EVAL.md). A width the user set wins; on a GPU
    nothing changes."""
    if mx.default_device() == mx.cpu:
        os.environ.setdefault("MLX_BFS_MAX_WIDTH", str(100 * cpu_cores()))


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def evaluate(model: str, out: str | Path, data: str | None = None, images: str | None = None,
             split: str = "test", adapter: str | None = None, catalog_path: str = "data/entities.json",
             baseline: str | None = None, batch_size: int = 20, max_tokens: int = 48,
             min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
             force: bool = False, models_root: str | None = None, progress: bool = True,
             prompt_suffix: dict[str, str] | None = None, references: list[list[str]] | None = None,
             drop_trained: bool = False) -> dict:
    """Run (or resume) an evaluation; returns the metrics. Prompting baselines: `prompt_suffix`
    maps a question kind to text appended to its questions (e.g. the candidate names);
    `references` are [image path, label] pictures shown before every question's picture.
    Pictures the model or adapter was trained on (or near-duplicates of them) are refused, or
    with `drop_trained` left out and counted in run.json."""
    let_cpu_streams_overlap()
    if (data is None) == (images is None):
        raise CultvlmError("give exactly one of --data DATASET (with --split) or --images DIR")
    check_decoding(max_tokens=max_tokens, min_pixels=min_pixels, max_pixels=max_pixels, batch_size=batch_size)
    catalog = load_catalog(catalog_path)
    items = (items_from_dataset(Path(data), split, catalog) if data
             else items_from_folder(Path(images), catalog))
    for item in items:
        if prompt_suffix and item["kind"] in prompt_suffix:
            item["prompt"] = f"{item['prompt']} {prompt_suffix[item['kind']]}"
    out = Path(out)
    model_dir = resolve_model(model, models_root)
    check_out_apart(out, "eval", ("adapter",), model=model_dir, adapter=adapter, data=data, images=images,
                    baseline=baseline)
    items, left_out = leave_out_trained(items, [model_dir, *([Path(adapter)] if adapter else [])], drop_trained)
    weights = {"model": _weight_files(model_dir), "adapter": _weight_files(Path(adapter)) if adapter else None}
    run = {"model": model, "adapter": adapter, "weights": weights, "dataset": str(data or images),
           "left_out_trained": left_out,
           "split": split if data else None,
           "catalog": str(catalog_path), "max_pixels": max_pixels, "min_pixels": min_pixels,
           "max_tokens": max_tokens, "prompt_suffix": prompt_suffix or None, "references": references or None, "items": len(items),
           "items_sha256": hashlib.sha256("\n".join(sorted(i["item_id"] for i in items)).encode()).hexdigest()}
    with output_lock(out, "eval"):
        done = _previous_predictions(out, run, force)
        write_json(out / "run.json", run | {"started_at": _now(), "finished_at": None})

        todo = [i for i in items if i["item_id"] not in done]
        if todo:
            model_obj, processor = load_model(model, adapter, models_root)
            float32_language_model_on_cpu(model_obj)
            scorer = AnswerScorer(catalog)
            # Same-sized images batch together; sorting by size keeps batches uniform.
            todo.sort(key=lambda i: (_image_size(i["image"], min_pixels, max_pixels), i["item_id"]))
            bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="item", disable=not progress)
            start = time.perf_counter()
            for b in range(0, len(todo), batch_size):
                batch = todo[b:b + batch_size]
                answers = generate_answers(model_obj, processor, batch, max_tokens, min_pixels, max_pixels,
                                           references or ())
                for item, answer in zip(batch, answers):
                    append_jsonl(out / "predictions.jsonl", score(item, answer, scorer))
                bar.update(len(batch))
                bar.set_postfix(items_s=f"{(b + len(batch)) / (time.perf_counter() - start):.2f}")
            bar.close()

        graded = lambda records: [p for p in records if p["correct"] is not None]  # noqa: E731 (not eval --images' unknowns)
        base = graded(read_jsonl(Path(baseline) / "predictions.jsonl")) if baseline else None
        metrics = compute_metrics(graded(read_jsonl(out / "predictions.jsonl")), base)
        write_json(out / "metrics.json", metrics)
        started = json.loads((out / "run.json").read_text(encoding="utf-8"))["started_at"]
        write_json(out / "run.json", run | {"started_at": started, "finished_at": _now()})
        return metrics


def leave_out_trained(items: list[dict], folders: list[Path], drop: bool) -> tuple[list[dict], int]:
    """The items whose picture no folder's model or adapter was trained on (data/check.py's
    record; near-duplicates count), and how many pictures were left out. Without `drop`, any
    such picture is an error: the figures would measure memory, not recognition."""
    pictures = {i["sha256"]: Path(i["image"]) for i in items}
    trained: dict[str, str] = {}
    for folder in folders:
        record = read_training_record(folder)
        if record:
            trained |= {sha: f"{why} of {folder}" for sha, why in trained_on(pictures, record).items()}
    if trained and not drop:
        sha, why = next(iter(sorted(trained.items())))
        raise CultvlmError(f"{len(trained)} of the {len(pictures)} pictures to evaluate were trained on (e.g. "
                           f"{printable(pictures[sha])}: {why}); evaluate on held-out pictures, or pass "
                           f"--drop-trained to leave them out (counted in run.json)")
    if len(trained) == len(pictures):
        raise CultvlmError(f"every one of the {len(pictures)} pictures to evaluate was trained on: nothing is left "
                           f"to evaluate")
    return [i for i in items if i["sha256"] not in trained], len(trained)


def _weight_files(folder: Path) -> list:
    """The weight files the answers come from, by name, size and modification time: a model or
    adapter retrained into the same folder makes an older run's answers stale (hashing would
    read gigabytes)."""
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.glob("*.safetensors"))]


OWN_FILES = ("run.json", "predictions.jsonl", "metrics.json", "*.json.tmp")  # all that --force may delete


def _previous_predictions(out: Path, run: dict, force: bool) -> set[str]:
    """Item ids already answered by an interrupted run with the same settings."""
    run_file = out / "run.json"
    if not run_file.is_file():
        out.mkdir(parents=True, exist_ok=True)
        return set()
    previous = json.loads(run_file.read_text(encoding="utf-8"))
    changed = [k for k in run if previous.get(k) != run[k]]
    if changed and not force:
        raise CultvlmError(f"{out}: holds a run with other settings ({', '.join(changed)}); "
                           "use another --out or --force to start over")
    if changed:
        remove_own(out, "eval", OWN_FILES)
        return set()
    return {p["item_id"] for p in read_jsonl(out / "predictions.jsonl")}


def _image_size(path: str, min_pixels: int, max_pixels: int) -> tuple[int, int]:


    with Image.open(path) as img:
        w, h = img.size
    return grid_size(h, w, min_pixels, max_pixels)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
