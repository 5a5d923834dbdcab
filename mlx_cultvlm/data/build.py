"""`cultvlm data build`: images + catalog (+ captions) -> one self-contained dataset folder.

    <out>/train.jsonl, valid.jsonl, test.jsonl   lines in the shape samples.py reads
    <out>/images/<entity>/<sha256[:16]><ext>     hard links to the originals (copies across disks)
    <out>/README.md                              the dataset card: counts, sources, the command
    <out>/build.json                             the options and every image's split

Every image gives several lines (`meta.kind`): `naming` (who is this? -> the canonical name, in
the question's language), `fact` (a catalog fact that states the entity's origin -- its work or
author -- when it has one: what eval's fact question asks), `describe` (its caption, when captions.jsonl
has an unflagged one), `verify_yes` / `verify_no` (is this X? with X a `confusable_with` entity
for the no), and for control entities `replay` (their own names, so the base keeps them) and
`verify_no`. A picture from `--negatives` (of no catalog entity; meta.entity null, meta.role
"negative", under `negatives/`) gives `unknown` (who is this? -> "I don't know this character")
and `verify_no` about a target. Wording is drawn from a generator seeded by (seed, sha256): an image always gets
the same lines.

How images are split
--------------------
1. Near-duplicate groups: images whose perceptual hashes differ in at most --near-threshold bits
   (or are byte-identical) are joined, transitively. A group goes to one split as a whole, so no
   test picture has a near-duplicate in train.
2. Remembered splits: build.json keeps each image's split (by sha256). Rebuilding into the same
   --out with the same --seed and --near-threshold keeps them: an image never moves, and a group
   with a remembered image follows it. (A new image that joins groups remembered in different
   splits is left out, and reported.)
3. New groups, per entity, in the order of sha256("<seed>:<smallest sha256 in the group>"), go
   to the first of test, valid, train still below its quota: round(fraction x the entity's
   group count); a target gets at least one test group, and needs ceil(1 / test fraction)
   groups for that. A control with fewer goes wholly to train, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shlex
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import click

from ..errors import CultvlmError
from ..files import check_out_apart, check_replaceable, output_lock, partial_folder, replace_folder, write_json
from ..score import AnswerScorer
from .add import source_records
from .catalog import LANGS, Entity, load_catalog
from .check import DEFAULT_MIN_SIDE, DEFAULT_NEAR_THRESHOLD, NEGATIVES, ImageRecord, check_images, near_pairs
from .questions import DESCRIBE_QUESTIONS, EVAL_QUESTIONS, FACT_QUESTIONS, NAMING_QUESTIONS, VERIFY_QUESTION

SPLITS = ("train", "valid", "test")
FILL_ORDER = ("test", "valid", "train")  # new groups fill the held-out splits first

NAMED = {"ru": "Это {name}.", "en": "This is {name}."}
UNKNOWN = {"ru": "Я не знаю этого персонажа.", "en": "I don't know this character."}
NOT_HIM = {"ru": "Нет, это не {wrong}.", "en": "No, this is not {wrong}."}
FACT_ANSWER = {"ru": "Это {name}. {fact}", "en": "This is {name}. {fact}"}
YES = {"ru": "Да, это {name}.", "en": "Yes, this is {name}."}
NO = {"ru": "Нет, это не {wrong}, а {name}.", "en": "No, this is {name}, not {wrong}."}


@dataclass
class Group:
    members: list[ImageRecord]  # in path order
    entity: str  # its first member's: the entity whose quota it counts against
    key: str  # the smallest sha256 in it


@dataclass
class BuildResult:
    out: Path
    split_of: dict[str, str]  # sha256 -> split, for the images in this build
    samples: Counter = field(default_factory=Counter)  # (entity, kind, split) -> lines
    images: Counter = field(default_factory=Counter)  # (entity, split) -> images
    skipped: Counter = field(default_factory=Counter)  # reason -> images
    warnings: list[str] = field(default_factory=list)


def near_duplicate_groups(usable: list[ImageRecord], threshold: int) -> list[Group]:
    """Union-find over near-duplicate pairs and equal sha256."""
    parent = list(range(len(usable)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pairs = [(i, j) for i, j, _ in near_pairs(usable, threshold)]
    first_with: dict[str, int] = {}
    for j, record in enumerate(usable):
        pairs.append((first_with.setdefault(record.sha256, j), j))
    for i, j in pairs:
        parent[root(j)] = root(i)
    members: dict[int, list[ImageRecord]] = {}
    for i, record in enumerate(usable):
        members.setdefault(root(i), []).append(record)
    return [Group(m, m[0].entity, min(r.sha256 for r in m)) for m in members.values()]


def min_groups_needed(test_fraction: float) -> int:
    """Distinct pictures a target needs so that one of them is a fair test share."""
    return max(2, math.ceil(1 / test_fraction - 1e-9))


def quotas(n_groups: int, valid_fraction: float, test_fraction: float, with_test: bool) -> dict[str, int]:
    if not with_test:
        return {"test": 0, "valid": 0, "train": n_groups}
    test = min(max(1, math.floor(n_groups * test_fraction + 0.5)), n_groups - 1)
    valid = max(0, min(math.floor(n_groups * valid_fraction + 0.5), n_groups - test - 1))
    return {"test": test, "valid": valid, "train": n_groups - test - valid}


def order_key(seed: int, group: Group) -> str:
    return hashlib.sha256(f"{seed}:{group.key}".encode()).hexdigest()


def assign_splits(groups: list[Group], remembered: dict[str, str], seed: int, valid_fraction: float,
                  test_fraction: float) -> tuple[dict[str, str], list[ImageRecord]]:
    """sha256 -> split for every member of every group, and the images left out (see the module
    docstring for the rule)."""
    split_of: dict[str, str] = {}
    left_out: list[ImageRecord] = []
    have: dict[str, Counter] = defaultdict(Counter)
    fresh: dict[str, list[Group]] = defaultdict(list)
    for group in groups:
        old = {remembered[r.sha256] for r in group.members if r.sha256 in remembered}
        if not old:
            fresh[group.entity].append(group)
            continue
        for split in old:
            have[group.entity][split] += 1
        for r in group.members:
            if r.sha256 in remembered:
                split_of[r.sha256] = remembered[r.sha256]
            elif len(old) == 1:
                split_of[r.sha256] = next(iter(old))
            else:  # it would pull pictures of different splits together: leave it out
                left_out.append(r)
    n_groups = Counter(g.entity for g in groups)
    for entity_id, new_groups in fresh.items():
        with_test = n_groups[entity_id] >= min_groups_needed(test_fraction)
        quota = quotas(n_groups[entity_id], valid_fraction, test_fraction, with_test)
        for group in sorted(new_groups, key=lambda g: order_key(seed, g)):
            split = next((s for s in FILL_ORDER if have[entity_id][s] < quota[s]), "train")
            have[entity_id][split] += 1
            for r in group.members:
                split_of[r.sha256] = split
    return split_of, left_out


def read_captions(path: Path) -> dict[str, dict[str, dict]]:
    """sha256 -> lang -> the latest caption line; flagged captions dropped. A torn last line
    (an interrupted `data caption`) is ignored; any other broken line is an error."""
    # Bytes, line by line: a torn write can end in the middle of a UTF-8 character.
    lines = path.read_bytes().splitlines()
    last = max((n for n, line in enumerate(lines, start=1) if line.strip()), default=0)
    latest: dict[tuple[str, str], dict] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if lineno == last:
                click.echo(f"warning: {path}:{lineno}: torn last line ignored", err=True)
                continue
            raise CultvlmError(f"{path}:{lineno}: not valid JSON ({getattr(e, 'msg', e)})") from None
        if not (isinstance(record, dict) and isinstance(record.get("sha256"), str)
                and isinstance(record.get("entity"), str) and isinstance(record.get("flagged"), bool)
                and isinstance(record.get("caption"), str) and (record["caption"].strip() or record["flagged"])):
            raise CultvlmError(f"{path}:{lineno}: a caption line needs sha256, entity, caption (text, "
                               f"non-empty unless flagged) and flagged (true/false)")
        if record.get("lang") not in LANGS:
            raise CultvlmError(f"{path}:{lineno}: lang must be one of {', '.join(LANGS)}, got {record.get('lang')!r}")
        latest[(record["sha256"], record["lang"])] = record  # a re-captioned image: the later line wins
    captions: dict[str, dict[str, dict]] = defaultdict(dict)
    for (sha, lang), record in latest.items():
        if not record["flagged"]:
            captions[sha][lang] = record
    return captions


def line(image: str, question: str, answer: str, meta: dict) -> dict:
    return {"images": [image],
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                         {"role": "assistant", "content": answer}],
            "meta": meta}


def origin_facts(catalog: dict[str, Entity]) -> dict[str, dict[str, list[str]]]:
    """Per entity and language, the facts a `fact` line may state: those that say where the
    entity comes from (its work or author, as `cultvlm eval` grades the fact question), or every
    fact when none does."""
    scorer = AnswerScorer(catalog)
    return {e: {lang: [f for f in facts if scorer.states_origin(f, e)] or list(facts)
                for lang, facts in entity.facts.items()} for e, entity in catalog.items()}


def samples_for(record: ImageRecord, image: str, split: str, catalog: dict[str, Entity],
                captions: dict[str, dict], seed: int, facts: dict[str, dict[str, list[str]]]) -> list[dict]:
    """Every line one image gives; the same image and seed always give the same lines. `facts`:
    `origin_facts(catalog)`."""
    entity = catalog[record.entity]
    rng = random.Random(f"{seed}:{record.sha256}")
    lines = []

    def add(kind: str, lang: str, question: str, answer: str) -> None:
        meta = {"entity": entity.id, "kind": kind, "sha256": record.sha256, "split": split, "lang": lang}
        lines.append(line(image, question, answer, meta))

    target = entity.role == "target"
    for lang in LANGS:
        name = entity.name(lang)
        add("naming" if target else "replay", lang, rng.choice(NAMING_QUESTIONS[lang]), NAMED[lang].format(name=name))
        if target and facts[entity.id].get(lang):
            fact = rng.choice(facts[entity.id][lang])
            add("fact", lang, rng.choice(FACT_QUESTIONS[lang]), FACT_ANSWER[lang].format(name=name, fact=fact))
    for lang, caption in sorted(captions.get(record.sha256, {}).items()):
        if caption["entity"] == entity.id:  # otherwise the caption was written for another label
            add("describe", lang, rng.choice(DESCRIBE_QUESTIONS[lang]), caption["caption"].strip())
    yes_lang = rng.choice(LANGS)
    no_lang = next(lang for lang in LANGS if lang != yes_lang)
    if target:
        name = entity.name(yes_lang)
        add("verify_yes", yes_lang, VERIFY_QUESTION[yes_lang].format(name=name), YES[yes_lang].format(name=name))
    # Hard negatives from confusable_with; without any, another entity of the catalog.
    others = entity.confusable_with or sorted(e for e in catalog if e != entity.id)
    if others:
        wrong, name = catalog[rng.choice(others)].name(no_lang), entity.name(no_lang)
        if wrong != name:
            add("verify_no", no_lang, VERIFY_QUESTION[no_lang].format(name=wrong), NO[no_lang].format(name=name, wrong=wrong))
    return lines


def negative_samples_for(record: ImageRecord, image: str, split: str, catalog: dict[str, Entity],
                         seed: int) -> list[dict]:
    """An out-of-catalog picture's lines: who is this? -> "I don't know this character" (kind
    `unknown`: training on them teaches restraint), and is this <a target>? -> no."""
    rng = random.Random(f"{seed}:{record.sha256}")
    lines = []

    def add(kind: str, lang: str, question: str, answer: str) -> None:
        meta = {"entity": None, "role": "negative", "kind": kind, "sha256": record.sha256, "split": split, "lang": lang}
        lines.append(line(image, question, answer, meta))

    for lang in LANGS:
        add("unknown", lang, rng.choice(NAMING_QUESTIONS[lang]), UNKNOWN[lang])
    targets = [e for e in catalog.values() if e.role == "target"]
    if targets:
        lang = rng.choice(LANGS)
        wrong = rng.choice(targets).name(lang)
        add("verify_no", lang, VERIFY_QUESTION[lang].format(name=wrong), NOT_HIM[lang].format(wrong=wrong))
    return lines


OWN_FILES = ("build.json", "train.jsonl", "valid.jsonl", "test.jsonl", "images", "README.md")  # what it writes


def remembered_splits(out: Path, seed: int, near_threshold: int) -> dict[str, str]:
    """The splits of the build already in `out`, if it used the same seed and threshold."""
    path = out / "build.json"
    if not path.is_file():
        return {}
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
        splits = previous["splits"]
        if not all(isinstance(k, str) and v in SPLITS for k, v in splits.items()):
            raise ValueError("splits must map sha256 to train, valid or test")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CultvlmError(f"{path}: unreadable ({e}); it keeps the earlier build's splits -- restore it, "
                           f"or build into a new --out") from None
    if (previous.get("seed"), previous.get("near_threshold")) != (seed, near_threshold):
        click.echo(f"note: {out} was built with seed {previous.get('seed')} and near-threshold "
                   f"{previous.get('near_threshold')}: splits are drawn afresh", err=True)
        return {}
    return splits


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def write_jsonl(path: Path, lines: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in lines)


def dataset_card(result: BuildResult, catalog: dict[str, Entity], command: str,
                 sources: list[tuple[str, str, dict | None]]) -> str:
    out = [f"# {result.out.name}", "",
           "Built by `cultvlm data build`; the lines are what `cultvlm lora` reads "
           "(images are relative to this folder).", "",
           "## Build command", "", "```bash", command, "```", "",
           "## Images per split", "", "| entity | role | train | valid | test |", "|---|---|---:|---:|---:|"]
    order = [*catalog, NEGATIVES]
    entities = sorted({e for e, _ in result.images}, key=order.index)
    for e in entities:
        role = catalog[e].role if e in catalog else "out of catalog"
        out.append(f"| {e} | {role} | " + " | ".join(str(result.images[e, s]) for s in SPLITS) + " |")
    if result.skipped:
        out += ["", "Skipped: " + ", ".join(f"{n} {why}" for why, n in sorted(result.skipped.items())) + "."]
    out += ["", "## Samples per entity, kind and split", "",
            "| entity | kind | train | valid | test |", "|---|---|---:|---:|---:|"]
    for e in entities:
        for kind in sorted({k for en, k, _ in result.samples if en == e}):
            out.append(f"| {e} | {kind} | " + " | ".join(str(result.samples[e, kind, s]) for s in SPLITS) + " |")
    out += ["", "## Questions evaluation asks, never asked in training", "",
            "`cultvlm eval` asks each held-out picture one of these phrasings per kind (by the picture's "
            "hash); no line of this dataset asks any of them:", ""]
    out += [f"- {kind} ({lang}): " + " / ".join(f"«{q}»" for q in questions)
            for kind, by_lang in EVAL_QUESTIONS.items() for lang, questions in by_lang.items()]
    out += ["", "## How the splits were made", "",
            "Near-duplicates (perceptual hash within the threshold, or identical bytes) form groups that "
            "stay in one split. `build.json` remembers each image's split: rebuilding into this folder "
            "with the same seed and threshold never moves an image. New groups go, per entity, in the "
            "order of sha256(seed:group) to test, valid, then train, until each split has its share.", "",
            "## Sources and licenses", "", "| image | entity | source | author | license |", "|---|---|---|---|---|"]
    for image, entity_id, src in sources:
        if src is None:
            out.append(f"| {image} | {entity_id} | user-supplied | | |")
        else:
            # The file's page (Commons' description_url) credits better than a thumbnail's address.
            cells = [str(v or "").replace("|", "\\|") for v in
                     (src.get("description_url") or src.get("source_url"), src.get("author"), src.get("license"))]
            out.append(f"| {image} | {entity_id} | " + " | ".join(cells) + " |")
    if result.warnings:
        out += ["", "## Warnings", ""] + [f"- {w}" for w in result.warnings]
    return "\n".join(out) + "\n"


def build_dataset(out: str | Path, images_root: str | Path = "data/images",
                  catalog_path: str | Path = "data/entities.json", captions_path: str | Path | None = None,
                  seed: int = 0, valid_fraction: float = 0.15, test_fraction: float = 0.2,
                  near_threshold: int = DEFAULT_NEAR_THRESHOLD, min_side: int = DEFAULT_MIN_SIDE,
                  negatives: str | Path | None = None) -> BuildResult:
    """Build the dataset folder `out` (see the module docstring); an existing build there is
    replaced only once the new one is complete, keeping its images' splits. `negatives`: a
    folder of pictures of no catalog entity, split like an entity's."""
    out, images_root = Path(out), Path(images_root)
    if not (0 < test_fraction < 1 and 0 <= valid_fraction < 1 and test_fraction + valid_fraction < 1):
        raise CultvlmError(f"fractions must leave room for training: 0 < --test-fraction ({test_fraction}), "
                           f"0 <= --valid-fraction ({valid_fraction}), and their sum < 1")
    if out.exists() and not out.is_dir():
        raise CultvlmError(f"{out}: exists and is not a folder")
    check_out_apart(out, "data build", images=images_root, negatives=negatives, catalog=catalog_path,
                    captions=captions_path)
    check_replaceable(out, "data build", OWN_FILES)
    catalog = load_catalog(catalog_path)
    beside_images = Path(os.path.normpath(images_root / "..")) / "captions.jsonl"
    if captions_path is None and beside_images.is_file():
        captions_path = beside_images
    if captions_path and not Path(captions_path).is_file():
        raise CultvlmError(f"{captions_path}: no such captions file")
    captions = read_captions(Path(captions_path)) if captions_path else {}
    records = check_images(images_root, catalog, min_side, near_threshold, negatives)
    usable = [r for r in records if r.usable]
    result = BuildResult(out, {})
    for r in records:
        if not r.usable:
            result.skipped[{"duplicate_of": "exact duplicates", "too_small": "too small"}.get(
                r.status.split(":")[0], "unreadable")] += 1

    groups = near_duplicate_groups(usable, near_threshold)
    n_groups = Counter(g.entity for g in groups)
    needed = min_groups_needed(test_fraction)
    with_files = {r.entity for r in records}
    too_few = [f"{e} has {n_groups[e]}" for e, entity in catalog.items()
               if entity.role == "target" and e in with_files and n_groups[e] < needed]
    if too_few:
        raise CultvlmError(f"too few distinct pictures for a {test_fraction:.0%} test split (near-duplicates count "
                           f"once; each target needs at least {needed}): {', '.join(too_few)} -- add pictures "
                           f"or lower --test-fraction")
    for e, entity in catalog.items():
        if e not in with_files:
            result.warnings.append(f"{e} ({entity.role}): no images in {images_root / e}, not in this dataset")
        elif entity.role == "control" and n_groups[e] < needed:
            result.warnings.append(f"control {e}: {n_groups[e]} distinct picture(s), fewer than the {needed} "
                                   f"a test split needs: all of them go to train")
    if None in with_files and n_groups[None] < needed:
        result.warnings.append(f"negatives: {n_groups[None]} distinct picture(s), fewer than the {needed} a test "
                               f"split needs: all of them go to train, and eval has no out-of-catalog pictures")
    for g in groups:
        if len({r.entity for r in g.members}) > 1:
            result.warnings.append("near-duplicates under different entities (check the labels): "
                                   + ", ".join(r.path for r in g.members))

    remembered = remembered_splits(out, seed, near_threshold)
    split_of, left_out = assign_splits(groups, remembered, seed, valid_fraction, test_fraction)
    for r in left_out:
        result.skipped["left out (would join groups of different splits)"] += 1
        result.warnings.append(f"{r.path}: left out, it is a near-duplicate of images in different splits")
    result.split_of = split_of
    if "train" not in split_of.values():
        raise CultvlmError(f"{images_root}: no usable images to train on (see `cultvlm data check`)")

    with output_lock(out, "data build"):
        partial = partial_folder(out)
        lines: dict[str, list[dict]] = {s: [] for s in SPLITS}
        sources, source_cache = [], {}
        facts = origin_facts(catalog)
        for r in usable:
            if r.sha256 not in split_of:
                continue
            folder, name = (images_root / r.entity, r.entity) if r.entity else (Path(negatives), NEGATIVES)
            src = folder / r.path.split("/", 1)[1]
            image = f"images/{r.entity}/{r.sha256[:16]}{src.suffix.lower()}" if r.entity else \
                f"{NEGATIVES}/{r.sha256[:16]}{src.suffix.lower()}"  # outside images/: no entity id can clash
            link_or_copy(src, partial / image)
            split = split_of[r.sha256]
            result.images[name, split] += 1
            made = (samples_for(r, image, split, catalog, captions, seed, facts) if r.entity
                    else negative_samples_for(r, image, split, catalog, seed))
            for sample in made:
                lines[split].append(sample)
                result.samples[name, sample["meta"]["kind"], split] += 1
            if name not in source_cache:
                source_cache[name] = source_records(folder)
            sources.append((image, name, source_cache[name].get(r.path.split("/", 1)[1])))
        if not lines["valid"]:
            result.warnings.append("valid.jsonl is empty and `cultvlm lora` needs it: add pictures or raise "
                                   "--valid-fraction")
        for split in SPLITS:
            write_jsonl(partial / f"{split}.jsonl", lines[split])

        command = shlex.join(["cultvlm", "data", "build", "--out", str(out), "--images", str(images_root),
                              "--catalog", str(catalog_path)]
                             + (["--captions", str(captions_path)] if captions_path else [])
                             + ["--seed", str(seed), "--valid-fraction", str(valid_fraction),
                                "--test-fraction", str(test_fraction), "--near-threshold", str(near_threshold),
                                "--min-side", str(min_side)]
                             + (["--negatives", str(negatives)] if negatives else []))
        (partial / "README.md").write_text(dataset_card(result, catalog, command, sources), encoding="utf-8")
        # Remembered splits of images absent now are kept, so they return to their split if re-added.
        write_json(partial / "build.json", {"seed": seed, "near_threshold": near_threshold,
                                            "valid_fraction": valid_fraction, "test_fraction": test_fraction,
                                            "command": command, "splits": {**remembered, **split_of}})
        replace_folder(partial, out, "data build", OWN_FILES)
    return result


@click.command("build")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="dataset folder, e.g. datasets/culture")
@click.option("--images", "images_root", default="data/images", show_default=True, type=click.Path(file_okay=False))
@click.option("--catalog", "catalog_path", default="data/entities.json", show_default=True,
              type=click.Path(dir_okay=False))
@click.option("--captions", "captions_path", default=None, type=click.Path(dir_okay=False),
              help="captions JSONL [default: <images>/../captions.jsonl, if present]")
@click.option("--seed", type=int, default=0, show_default=True, help="orders new groups for the split quotas")
@click.option("--valid-fraction", type=float, default=0.15, show_default=True)
@click.option("--test-fraction", type=float, default=0.2, show_default=True)
@click.option("--near-threshold", type=click.IntRange(0, 64), default=DEFAULT_NEAR_THRESHOLD, show_default=True,
              help="most perceptual-hash bits (of 64) two near-duplicates may differ in")
@click.option("--min-side", type=click.IntRange(min=1), default=DEFAULT_MIN_SIDE, show_default=True,
              help="skip images with a shorter side")
@click.option("--negatives", type=click.Path(file_okay=False), default=None,
              help="a folder of pictures of no catalog entity: split like an entity's, asked \"who is this?\" "
                   "(trained to answer \"I don't know\") and \"is this <a target>?\"; eval's false positives")
def command(out, images_root, catalog_path, captions_path, seed, valid_fraction, test_fraction, near_threshold,
            min_side, negatives):
    """Turn images, the catalog and captions into train/valid/test.jsonl, split by near-duplicate
    group, per entity, stably."""
    result = build_dataset(out, images_root, catalog_path, captions_path, seed, valid_fraction, test_fraction,
                           near_threshold, min_side, negatives)
    per_split = Counter()
    for (_, _, split), n in result.samples.items():
        per_split[split] += n
    click.echo(f"{out}: " + ", ".join(f"{per_split[s]} {s}" for s in SPLITS) + " lines")
    entities = sorted({e for e, _ in result.images})
    width = max([len("entity")] + [len(e) for e in entities])
    click.echo(f"{'entity':<{width}}  " + "  ".join(f"{s:>5}" for s in SPLITS) + "  (images)")
    for e in entities:
        click.echo(f"{e:<{width}}  " + "  ".join(f"{result.images[e, s]:>5}" for s in SPLITS))
    if result.skipped:
        click.echo("skipped: " + ", ".join(f"{n} {why}" for why, n in sorted(result.skipped.items())))
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"dataset card: {Path(out) / 'README.md'}")
