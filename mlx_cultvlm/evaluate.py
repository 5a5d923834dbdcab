"""`cultvlm eval`: ask a model a fixed set of questions about held-out images and score them.

Every image gets the same probe set, so base and tuned models answer exactly the same items:

    naming_ru, naming_en   who is this?                     right if the answer names the entity
    fact                   which work is it from, who made it?  right if it mentions the work or author
    verify_yes             "Is this <entity>?"              right if the answer is yes
    verify_no              "Is this <a look-alike>?"        right if the answer is no

Decoding is greedy, with a pinned pixel budget and a fixed max-token count (recorded in run.json).
Answers are generated in batches (`generate.answer_steps`: each picture encoded once for all
its questions, left padding) and appended to predictions.jsonl as each batch finishes, so a killed run resumes
without redoing finished items.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import click

from .data.catalog import Entity, load_catalog
from .errors import CultvlmError
from .files import NOT_UTF8, append_jsonl, printable, read_jsonl, utf8_name, write_json
from .images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, check_budget, fit_to_budget, load_image

QUESTIONS = {
    "naming_ru": ("ru", "Кто изображён на картинке? Назови персонажа."),
    "naming_en": ("en", "Who is shown in this picture? Name the character."),
    "fact": ("ru", "Из какого произведения этот персонаж и кто его создал?"),
    "verify_yes": ("ru", "Это {name}? Ответь «да» или «нет»."),
    "verify_no": ("ru", "Это {name}? Ответь «да» или «нет»."),
}
PROBE_KINDS = ("naming_ru", "naming_en")  # --images: the entity may be unknown
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}


def look_alike(entity: Entity, sha256: str, catalog: dict[str, Entity]) -> Entity:
    """The entity a verify_no question asks about: the first confusable one, else another
    catalog entity picked by the image's hash (the same for every run)."""
    if entity.confusable_with:
        return catalog[entity.confusable_with[0]]
    others = sorted(k for k in catalog if k != entity.id)
    return catalog[others[int(sha256[:8], 16) % len(others)]]


def items_for_image(image: str, sha256: str, entity: Entity | None, catalog: dict[str, Entity],
                    kinds=tuple(QUESTIONS)) -> list[dict]:
    items = []
    for kind in kinds:
        if entity is None and kind not in PROBE_KINDS:
            continue
        if kind == "fact" and not (entity.origin.get("work") or entity.origin.get("author")):
            continue
        lang, question = QUESTIONS[kind]
        asked = {"verify_yes": entity, "verify_no": look_alike(entity, sha256, catalog) if entity else None}.get(kind)
        items.append({
            "item_id": f"{sha256[:16]}:{kind}", "image": image, "sha256": sha256,
            "entity": entity.id if entity else None, "role": entity.role if entity else None,
            "kind": kind, "lang": lang, "asked_about": asked.id if asked else None,
            "prompt": question.format(name=asked.name(lang)) if asked else question,
        })
    return items


def dataset_pictures(data: Path, split: str, catalog: dict[str, Entity]) -> dict[str, tuple[str, str]]:
    """sha256 -> (image path, entity id) of each distinct image of the split (a dataset line's
    meta names its entity)."""
    from .samples import read_jsonl as read_dataset, resolve_image

    path = data / f"{split}.jsonl"
    images: dict[str, tuple[str, str]] = {}
    for lineno, record in read_dataset(path):
        meta, where = record.get("meta") or {}, f"{path}:{lineno}"
        if not record.get("images") or "entity" not in meta:
            raise CultvlmError(f"{where}: needs an image and meta.entity to be evaluated")
        if meta["entity"] not in catalog:
            raise CultvlmError(f"{where}: entity {meta['entity']!r} is not in the catalog")
        image = resolve_image(data, record["images"][0], where)
        sha = meta.get("sha256") or _sha256(image)
        images.setdefault(sha, (str(image), meta["entity"]))
    return images


def items_from_dataset(data: Path, split: str, catalog: dict[str, Entity]) -> list[dict]:
    """One probe set per distinct image of the split."""
    return [item for sha, (image, entity) in sorted(dataset_pictures(data, split, catalog).items())
            for item in items_for_image(image, sha, catalog[entity], catalog)]


def reference_pictures(data: Path, catalog: dict[str, Entity], split: str = "train") -> list[list[str]]:
    """[image path, label] of one picture per entity of the split, in catalog order: the first by
    sha256 (a prompting baseline shows them before every question; training pictures, so a
    leak-free dataset never shows a test picture)."""
    first: dict[str, str] = {}
    for sha, (image, entity) in sorted(dataset_pictures(data, split, catalog).items()):
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
            for item in items_for_image(str(p), _sha256(p), catalog.get(p.parent.name), catalog, PROBE_KINDS)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def score(item: dict, answer: str, scorer) -> dict:
    """The prediction line: the item, the answer, what it was parsed as, and the verdict."""
    from .score import yes_no

    line = dict(item, answer=answer, named=None, yes_no=None, correct=None)
    if item["kind"] in ("verify_yes", "verify_no"):
        line["yes_no"] = yes_no(answer)
        if item["entity"]:
            line["correct"] = line["yes_no"] == ("yes" if item["kind"] == "verify_yes" else "no")
        return line
    line["named"] = scorer.named(answer)
    if item["entity"] is None:
        return line
    if item["kind"] == "fact":
        origin = scorer.catalog[item["entity"]].origin
        # A work titled after the character (Колобок, Винни-Пух) would count naming as a fact.
        phrases = [str(origin[k]) for k in ("work", "author", "studio")
                   if origin.get(k) and item["entity"] not in scorer.entities(str(origin[k]))]
        line["correct"] = any(scorer.mentions(answer, p) for p in phrases)
    else:
        line["correct"] = line["named"] == item["entity"]
    return line


def generate_answers(model, processor, items: list[dict], max_tokens: int, min_pixels: int,
                     max_pixels: int, references: list[list[str]] = ()) -> list[str]:
    """Greedy answers for a batch of items, one image each (after the [path, label] reference
    pictures, if any); each picture is loaded and encoded once however many of its questions
    the batch holds. On the CPU the pictures are shared out among the cores, one stream and
    batch each, run side by side: MLX runs a CPU stream on one core, and the rows of a batch
    are independent."""
    import mlx.core as mx

    from .generate import answer_steps, run_side_by_side

    if not items:
        return []
    pictures = {path: fit_to_budget(load_image(path), min_pixels, max_pixels)
                for path in dict.fromkeys([*(path for path, _ in references), *(item["image"] for item in items)])}
    shown = [(pictures[path], label) for path, label in references]
    distinct = list(dict.fromkeys(item["image"] for item in items))
    workers = min(len(distinct), cpu_cores()) if mx.default_device() == mx.cpu else 1
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


@functools.cache
def _cpu_streams(n: int) -> list:
    """n CPU streams, made once: every new stream starts a worker thread that lives as long as
    the process."""
    import mlx.core as mx

    return [mx.new_stream(mx.cpu) for _ in range(n)]


def let_cpu_streams_overlap() -> None:
    """On the CPU, let one `mx.eval` over the cores' streams keep them all busy; call it before
    the process evaluates anything (MLX reads the setting once, at its first evaluation). MLX
    lays a graph out breadth-first at most MLX_BFS_MAX_WIDTH arrays wide (default 20) and runs it
    at most ten tasks ahead, so at 20 the streams' graphs come out as long runs of one stream
    while the other cores wait (measured in docs/EVAL.md). A width the user set wins; on a GPU
    nothing changes."""
    import os

    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        os.environ.setdefault("MLX_BFS_MAX_WIDTH", str(100 * cpu_cores()))


def cpu_cores() -> int:
    """The cores this process may run on."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def evaluate(model: str, out: str | Path, data: str | None = None, images: str | None = None,
             split: str = "test", adapter: str | None = None, catalog_path: str = "data/entities.json",
             baseline: str | None = None, batch_size: int = 20, max_tokens: int = 48,
             min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
             force: bool = False, models_root: str | None = None, progress: bool = True,
             prompt_suffix: dict[str, str] | None = None, references: list[list[str]] | None = None) -> dict:
    """Run (or resume) an evaluation; returns the metrics. Prompting baselines: `prompt_suffix`
    maps a question kind to text appended to its questions (e.g. the candidate names);
    `references` are [image path, label] pictures shown before every question's picture."""
    from tqdm import tqdm

    from .generate import float32_language_model_on_cpu, load_model
    from .metrics import compute_metrics
    from .score import AnswerScorer

    let_cpu_streams_overlap()
    if (data is None) == (images is None):
        raise CultvlmError("give exactly one of --data DATASET (with --split) or --images DIR")
    check_budget(min_pixels, max_pixels)
    catalog = load_catalog(catalog_path)
    items = (items_from_dataset(Path(data), split, catalog) if data
             else items_from_folder(Path(images), catalog))
    for item in items:
        if prompt_suffix and item["kind"] in prompt_suffix:
            item["prompt"] = f"{item['prompt']} {prompt_suffix[item['kind']]}"
    out = Path(out)
    from .models import resolve_model

    weights = {"model": _weight_files(resolve_model(model, models_root)),
               "adapter": _weight_files(Path(adapter)) if adapter else None}
    run = {"model": model, "adapter": adapter, "weights": weights, "dataset": str(data or images),
           "split": split if data else None,
           "catalog": str(catalog_path), "max_pixels": max_pixels, "min_pixels": min_pixels,
           "max_tokens": max_tokens, "prompt_suffix": prompt_suffix or None, "references": references or None, "items": len(items),
           "items_sha256": hashlib.sha256("\n".join(sorted(i["item_id"] for i in items)).encode()).hexdigest()}
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

    predictions = read_jsonl(out / "predictions.jsonl")
    base = read_jsonl(Path(baseline) / "predictions.jsonl") if baseline else None
    metrics = compute_metrics([p for p in predictions if p["entity"]], base)
    write_json(out / "metrics.json", metrics)
    started = json.loads((out / "run.json").read_text(encoding="utf-8"))["started_at"]
    write_json(out / "run.json", run | {"started_at": started, "finished_at": _now()})
    return metrics


def _weight_files(folder: Path) -> list:
    """The weight files the answers come from, by name, size and modification time: a model or
    adapter retrained into the same folder makes an older run's answers stale (hashing would
    read gigabytes)."""
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.glob("*.safetensors"))]


def _previous_predictions(out: Path, run: dict, force: bool) -> set[str]:
    """Item ids already answered by an interrupted run with the same settings."""
    import shutil

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
        shutil.rmtree(out)
        out.mkdir(parents=True)
        return set()
    return {p["item_id"] for p in read_jsonl(out / "predictions.jsonl")}


def _image_size(path: str, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    from PIL import Image

    from .images import grid_size

    with Image.open(path) as img:
        w, h = img.size
    return grid_size(h, w, min_pixels, max_pixels)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
