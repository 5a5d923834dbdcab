"""`cultvlm data build`: leak-free, stratified, stable splits; the lines the trainer reads."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import imagehash
import pytest
from click.testing import CliRunner

from mlx_cultvlm.data.build import (DESCRIBE_QUESTIONS, FACT_QUESTIONS, NAMING_QUESTIONS, build_dataset, command,
                                    read_captions)
from mlx_cultvlm.data.catalog import load_catalog, save_catalog
from mlx_cultvlm.errors import CultvlmError
from mlx_cultvlm.score import AnswerScorer
from mlx_cultvlm.images import load_image
from mlx_cultvlm.samples import normalize_messages, read_dataset, resolve_image
from test_data_catalog import SHIPPED
from test_data_check import near_variant, picture, save

THRESHOLD = 6
TARGETS = ("cheburashka", "crocodile_gena", "kolobok")
# Distinct pictures per entity; spongebob has too few for a test split (a warning: it is a control).
DISTINCT = {"cheburashka": 8, "crocodile_gena": 8, "kolobok": 8, "mickey_mouse": 6, "spongebob": 3}
CHEB_CAPTION = "На картинке Чебурашка стоит возле ящика с апельсинами."


def write_subset_catalog(path: Path) -> Path:
    """The shipped entries of DISTINCT's entities (confusable_with kept within them)."""
    shipped = load_catalog(SHIPPED)
    subset = {e: shipped[e] for e in DISTINCT}
    for entity in subset.values():
        entity.confusable_with = [c for c in entity.confusable_with if c in subset]
    save_catalog(path, subset)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_tree(root: Path) -> tuple[Path, Path]:
    """data/images/<entity>/ with distinct pictures, near-duplicate variants (resized, JPEG),
    an exact duplicate and an unreadable file per target; captions and sources beside them."""
    images = root / "data" / "images"
    for n, (entity, count) in enumerate(DISTINCT.items()):
        for i in range(count):
            save(picture(100 * n + i), images / entity / f"p{i}.png")
    for entity in TARGETS:
        folder = images / entity
        for i in range(3):
            save(near_variant(picture(100 * TARGETS.index(entity) + i)), folder / f"p{i}_variant.jpg")
        shutil.copyfile(folder / "p3.png", folder / "p3_copy.png")
        (folder / "notes.jpg").write_text("not a picture")
    cheb0, gena0 = sha(images / "cheburashka" / "p0.png"), sha(images / "crocodile_gena" / "p0.png")
    captions = [
        {"sha256": cheb0, "entity": "cheburashka", "lang": "ru", "caption": CHEB_CAPTION, "flagged": False},
        {"sha256": cheb0, "entity": "cheburashka", "lang": "en", "caption": "A bear.", "flagged": True},
        {"sha256": gena0, "entity": "cheburashka", "lang": "ru", "caption": "Чебурашка.", "flagged": False},
    ]
    with (root / "data" / "captions.jsonl").open("wb") as f:
        f.write("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in captions).encode())
        f.write('{"sha256": "ab12", "entity": "cheburashka", "caption": "Это Чеб'.encode()[:-1])  # torn mid-character
    (images / "cheburashka" / "sources.jsonl").write_text(json.dumps(
        {"file": "p1.png", "source_url": "https://commons.wikimedia.org/wiki/File:X.png", "author": "Someone",
         "license": "CC BY-SA 4.0"}) + "\n", encoding="utf-8")
    return images, write_subset_catalog(root / "data" / "entities.json")


@pytest.fixture(scope="module")
def base_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("base")
    make_tree(root)
    return root


@pytest.fixture
def tree(base_tree, tmp_path) -> tuple[Path, Path]:
    """A private copy of the base tree (for tests that change it)."""
    shutil.copytree(base_tree / "data", tmp_path / "data")
    return tmp_path / "data" / "images", tmp_path / "data" / "entities.json"


@pytest.fixture(scope="module")
def built(base_tree, tmp_path_factory):
    """The base tree built once through the CLI: (dataset folder, its lines by split, CLI output)."""
    out = tmp_path_factory.mktemp("datasets") / "culture"
    data = base_tree / "data"
    result = CliRunner().invoke(command, ["--out", str(out), "--images", str(data / "images"),
                                          "--catalog", str(data / "entities.json"), "--seed", "3"])
    assert result.exit_code == 0, result.output
    lines = {split: [r for _, r in read_dataset(out / f"{split}.jsonl")] for split in ("train", "valid", "test")}
    return out, lines, result.output


def images_by_split(lines: dict[str, list[dict]]) -> dict[str, set[str]]:
    return {split: {r["images"][0] for r in records} for split, records in lines.items()}


def test_no_test_image_has_a_near_duplicate_in_train(built):
    out, lines, _ = built
    splits = images_by_split(lines)
    phash = {img: imagehash.phash(load_image(out / img)) for imgs in splits.values() for img in imgs}
    near = [(a, b) for a in phash for b in phash if a < b and phash[a] - phash[b] <= THRESHOLD]
    assert len(near) >= 9  # the 3 variants per target made it in: the check below can fail
    held_out = splits["test"] | splits["valid"]
    leaks = [(a, b) for a in held_out for b in splits["train"] if phash[a] - phash[b] <= THRESHOLD]
    assert leaks == []
    assert not splits["test"] & splits["valid"]


def test_a_mirrored_and_a_cropped_copy_land_in_their_originals_split(tmp_path):
    """Flipped and cropped derivatives (common on Commons) are near-duplicates of their original:
    whatever the seed, they go to its split, and no held-out picture is one of a training one."""
    from test_data_check import DERIVATIVES, write_catalog

    images = tmp_path / "images"
    for i in range(10):
        save(picture(500 + i, size=(200, 150)), images / "alpha" / f"p{i}.png")
    save(DERIVATIVES["mirrored"](picture(500)), images / "alpha" / "p0_mirrored.png")
    save(DERIVATIVES["10% off the right"](picture(501)), images / "alpha" / "p1_cropped.jpg")
    save(DERIVATIVES["mirrored, then 10% off the left"](picture(502)), images / "alpha" / "p2_both.png")
    catalog = write_catalog(tmp_path / "entities.json", ["alpha"])
    held_out = set()
    for seed in range(6):
        result = build_dataset(tmp_path / f"out{seed}", images, catalog, seed=seed)
        split = {path: result.split_of[sha(images / "alpha" / path)] for path in
                 ("p0.png", "p0_mirrored.png", "p1.png", "p1_cropped.jpg", "p2.png", "p2_both.png")}
        assert split["p0.png"] == split["p0_mirrored.png"] and split["p1.png"] == split["p1_cropped.jpg"]
        assert split["p2.png"] == split["p2_both.png"]
        held_out |= {p for p, s in split.items() if s != "train"}
    assert held_out  # some seed put a copied picture in a held-out split: the check above could fail


def test_negatives_are_split_and_asked_who_and_is_this(tmp_path):
    """Pictures of no catalog entity: checked against the rest, split like an entity's, taught
    "I don't know this character" in training, and evaluated as out-of-catalog pictures."""
    from mlx_cultvlm.data.catalog import load_catalog as load
    from mlx_cultvlm.evaluate import items_from_dataset
    from test_data_check import DERIVATIVES, write_catalog

    images, negatives = tmp_path / "images", tmp_path / "strangers"
    for i in range(10):
        save(picture(700 + i), images / "alpha" / f"p{i}.png")
    for i in range(10):
        save(picture(800 + i), negatives / ("owls" if i % 2 else "frogs") / f"n{i}.png")
    save(DERIVATIVES["mirrored"](picture(700)), negatives / "stray_alpha.png")  # a labelling mistake
    catalog = write_catalog(tmp_path / "entities.json", ["alpha"])
    result = build_dataset(tmp_path / "out", images, catalog, negatives=negatives)
    assert all(result.images["negatives", s] >= 2 for s in ("train", "valid", "test"))  # spread out
    assert sum(result.images["negatives", s] for s in ("train", "valid", "test")) == 11
    assert any("near-duplicates under different entities" in w and "negatives/stray_alpha.png" in w
               for w in result.warnings)
    lines = {split: [r for _, r in read_dataset(tmp_path / "out" / f"{split}.jsonl")] for split in ("train", "test")}
    unknown = [r for r in lines["train"] if r["meta"]["kind"] == "unknown"]
    assert unknown and all(r["meta"]["entity"] is None and r["meta"]["role"] == "negative" for r in unknown)
    assert {r["messages"][1]["content"] for r in unknown} == {"Я не знаю этого персонажа.", "I don't know this character."}
    assert all(r["images"][0].startswith("negatives/") for r in unknown)
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "| negatives | out of catalog |" in card and "Questions evaluation asks, never asked in training" in card
    probe = items_from_dataset(tmp_path / "out", "test", load(catalog))
    strangers = [p for p in probe if p["role"] == "negative"]
    assert strangers and all(p["entity"] is None for p in strangers)
    assert {p["kind"] for p in strangers} == {"naming_ru", "naming_en", "verify_no", "describe"}
    assert all(p["asked_about"] == "alpha" for p in strangers if p["kind"] == "verify_no")


def test_every_target_is_in_every_split(built):
    _, lines, output = built
    per_entity = defaultdict(Counter)
    for split, records in lines.items():
        for r in {r["meta"]["sha256"]: r for r in records}.values():
            per_entity[r["meta"]["entity"]][split] += 1
    for entity in TARGETS:  # 8 groups: 2 test, 1 valid, 5 train, and 11 images (3 variants)
        assert per_entity[entity]["test"] >= 2 and per_entity[entity]["valid"] >= 1, per_entity[entity]
        assert sum(per_entity[entity].values()) == 11
    assert per_entity["mickey_mouse"]["test"] == 1
    assert per_entity["spongebob"] == Counter(train=3)  # a control with too few: all in train
    assert "control spongebob: 3 distinct picture(s)" in output
    assert "skipped: 3 exact duplicates, 3 unreadable" in output


def test_lines_load_and_stay_inside_the_dataset(built):
    out, lines, _ = built
    for split, records in lines.items():
        for i, r in enumerate(records):
            where = f"{split}.jsonl:{i + 1}"
            path = resolve_image(out, r["images"][0], where)  # raises if it points outside
            assert path.is_file() and sha(path) == r["meta"]["sha256"]
            assert r["images"][0] == f"images/{r['meta']['entity']}/{r['meta']['sha256'][:16]}{path.suffix}"
            normalize_messages(r, 1, where)  # the trainer's own checks
            assert r["meta"]["split"] == split
            assert set(r["meta"]) == {"entity", "kind", "sha256", "split", "lang"}
    files = {p.relative_to(out).as_posix() for p in (out / "images").rglob("*") if p.is_file()}
    assert files == set().union(*images_by_split(lines).values())


def test_kinds_and_answers(built):
    out, lines, _ = built
    catalog = load_catalog(SHIPPED)
    scorer = AnswerScorer(catalog)
    records = [r for split in lines.values() for r in split]
    qa = [(r["meta"], r["messages"][0]["content"][1]["text"], r["messages"][1]["content"]) for r in records]
    kinds = defaultdict(set)
    for meta, question, answer in qa:
        kinds[meta["entity"]].add(meta["kind"])
        entity, lang = catalog[meta["entity"]], meta["lang"]
        name = entity.name(lang)
        if meta["kind"] in ("naming", "replay"):
            assert question in NAMING_QUESTIONS[lang]
            assert answer == {"ru": f"Это {name}.", "en": f"This is {name}."}[lang]
        elif meta["kind"] == "fact":
            assert question in FACT_QUESTIONS[lang]
            prefix = {"ru": f"Это {name}. ", "en": f"This is {name}. "}[lang]
            # A fact that states where the entity comes from: what eval's fact question asks.
            assert answer.startswith(prefix) and answer.removeprefix(prefix) in entity.facts[lang]
            assert scorer.states_origin(answer.removeprefix(prefix), entity.id), answer
        elif meta["kind"] == "verify_yes":
            assert (question, answer) in [("Это Чебурашка?", "Да, это Чебурашка."),
                                          ("Is this Cheburashka?", "Yes, this is Cheburashka.")] or \
                   meta["entity"] != "cheburashka"
            assert answer == {"ru": f"Да, это {name}.", "en": f"Yes, this is {name}."}[lang]
        elif meta["kind"] == "verify_no":
            wrong = question.removeprefix("Это ").removeprefix("Is this ").removesuffix("?")
            assert wrong != name
            wrong_ids = [e for e in catalog if catalog[e].name(lang) == wrong]
            if meta["entity"] == "cheburashka":
                assert wrong_ids[0] in ("mickey_mouse", "crocodile_gena")  # its confusable_with
            assert answer == {"ru": f"Нет, это не {wrong}, а {name}.", "en": f"No, this is {name}, not {wrong}."}[lang]
        elif meta["kind"] == "describe":
            assert (meta["entity"], lang, answer) == ("cheburashka", "ru", CHEB_CAPTION)
            assert question in DESCRIBE_QUESTIONS["ru"]
    for entity in TARGETS:
        assert {"naming", "fact", "verify_yes", "verify_no"} <= kinds[entity]
        assert not kinds[entity] & {"replay"}
    for entity in ("mickey_mouse", "spongebob"):
        assert kinds[entity] == {"replay", "verify_no"}
    # Only the unflagged caption of its own entity became a line.
    assert sum(m["kind"] == "describe" for m, _, _ in qa) == 1
    # Both languages of naming, for every image.
    naming = Counter((m["sha256"], m["lang"]) for m, _, _ in qa if m["kind"] in ("naming", "replay"))
    assert set(naming.values()) == {1} and len(naming) == 2 * len({m["sha256"] for m, _, _ in qa})


def test_dataset_card(built):
    out, lines, _ = built
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "cultvlm data build --out" in card and "--seed 3" in card and "--near-threshold 6" in card
    n_naming = sum(r["meta"]["entity"] == "cheburashka" and r["meta"]["kind"] == "naming" for r in lines["train"])
    assert f"| cheburashka | naming | {n_naming} |" in card
    assert "| CC BY-SA 4.0 |" in card and "Someone" in card
    assert "| user-supplied |" in card
    assert "Skipped: 3 exact duplicates, 3 unreadable." in card
    assert json.loads((out / "build.json").read_text(encoding="utf-8"))["seed"] == 3


def test_rebuild_keeps_every_old_image_in_its_split(tree, tmp_path):
    images, catalog = tree
    out = tmp_path / "datasets" / "culture"
    first = build_dataset(out, images, catalog, seed=5).split_of
    again = build_dataset(out, images, catalog, seed=5)
    assert again.split_of == first
    test_picture = next(images / "cheburashka" / f"p{i}.png" for i in range(8)
                        if first[sha(images / "cheburashka" / f"p{i}.png")] == "test")
    # New pictures, and a near-duplicate of a test picture, a while later.
    for i in range(8, 20):
        save(picture(1000 + i), images / "cheburashka" / f"p{i}.png")
        save(picture(2000 + i), images / "kolobok" / f"p{i}.png")
    variant = save(near_variant(load_image(test_picture)), images / "cheburashka" / "later_variant.jpg")
    later = build_dataset(out, images, catalog, seed=5).split_of
    assert {s: later[s] for s in first} == first
    assert later[sha(variant)] == "test"
    new = Counter(later[s] for s in later if s not in first)
    assert new["test"] >= 3 and new["valid"] >= 1 and new["train"] >= 10  # new groups fill the quotas
    # The files say the same as the result.
    on_disk = {r["meta"]["sha256"]: r["meta"]["split"]
               for split in ("train", "valid", "test") for _, r in read_dataset(out / f"{split}.jsonl")}
    assert on_disk == later


def test_same_input_same_lines(tree, tmp_path):
    images, catalog = tree
    a = build_dataset(tmp_path / "a", images, catalog, seed=1)
    b = build_dataset(tmp_path / "b", images, catalog, seed=1)
    for split in ("train", "valid", "test"):
        assert (a.out / f"{split}.jsonl").read_bytes() == (b.out / f"{split}.jsonl").read_bytes()


def test_too_few_pictures_for_a_test_split(tree, tmp_path):
    images, catalog = tree
    for i in range(3, 8):
        (images / "kolobok" / f"p{i}.png").unlink()
    (images / "kolobok" / "p3_copy.png").unlink()
    with pytest.raises(CultvlmError, match=r"each target needs at least 5\): kolobok has 3 -- add pictures"):
        build_dataset(tmp_path / "out", images, catalog)
    assert not (tmp_path / "out").exists()
    # Variants do not count: 3 pictures + 3 variants is still 3. A larger test share needs fewer.
    result = build_dataset(tmp_path / "out", images, catalog, test_fraction=0.34, valid_fraction=0.0)
    assert Counter(s for (e, s), n in result.images.items() if e == "kolobok" for _ in range(n))["test"] >= 1


def test_refuses_to_replace_a_folder_it_did_not_build(tree, tmp_path):
    images, catalog = tree
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("years of work")
    with pytest.raises(CultvlmError, match="holds thesis.txt, which `cultvlm data build` did not write"):
        build_dataset(out, images, catalog)
    assert (out / "thesis.txt").read_text() == "years of work"


def test_captions_errors(tmp_path):
    path = tmp_path / "captions.jsonl"
    good = json.dumps({"sha256": "a", "entity": "x", "lang": "ru", "caption": "Текст.", "flagged": False})
    path.write_text(good + "\n{broken\n" + good + "\n", encoding="utf-8")
    with pytest.raises(CultvlmError, match=rf"{path}:2: not valid JSON"):
        read_captions(path)
    path.write_text(json.dumps({"sha256": "a", "entity": "x", "lang": "de", "caption": "T", "flagged": False}) + "\n")
    with pytest.raises(CultvlmError, match=rf"{path}:1: lang must be one of ru, en"):
        read_captions(path)
    path.write_text(json.dumps({"sha256": "a", "entity": "x", "lang": "ru", "caption": "T"}) + "\n")
    with pytest.raises(CultvlmError, match=rf"{path}:1: a caption line needs"):
        read_captions(path)
    # A later line for the same image and language replaces the earlier one.
    flagged_then_fixed = [{"sha256": "a", "entity": "x", "lang": "ru", "caption": "Плохо.", "flagged": True},
                          {"sha256": "a", "entity": "x", "lang": "ru", "caption": "Хорошо.", "flagged": False}]
    path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in flagged_then_fixed), encoding="utf-8")
    assert read_captions(path)["a"]["ru"]["caption"] == "Хорошо."


def test_bad_fractions(tree, tmp_path):
    images, catalog = tree
    with pytest.raises(CultvlmError, match="fractions must leave room for training"):
        build_dataset(tmp_path / "out", images, catalog, valid_fraction=0.5, test_fraction=0.5)


def test_nothing_to_train_on(tmp_path):
    images = tmp_path / "images"
    (images / "spongebob").mkdir(parents=True)
    (images / "spongebob" / "a.jpg").write_text("not a picture")
    catalog = write_subset_catalog(tmp_path / "entities.json")
    with pytest.raises(CultvlmError, match="no usable images to train on"):
        build_dataset(tmp_path / "out", images, catalog)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entities.json", "images"]  # no half-built folder


def test_fact_lines_state_the_origin_when_a_fact_does():
    from mlx_cultvlm.data.build import origin_facts
    from mlx_cultvlm.data.catalog import Entity

    catalog = {"kolobok": Entity("kolobok", {"ru": ["Колобок"], "en": ["Kolobok"]},
                                 {"ru": ["Колобок — герой восточнославянской народной сказки.", "Его съела лиса."],
                                  "en": ["The fox eats him.", "He is the hero of an East Slavic folk tale."]},
                                 origin={"work": "Колобок", "author": "восточнославянская народная сказка",
                                         "author_en": "East Slavic folk tale"}),
               "pikachu": Entity("pikachu", {"en": ["Pikachu"]}, {"ru": [], "en": ["Pikachu is yellow."]},
                                 origin={"author": "Game Freak, Nintendo"}, role="control")}
    facts = origin_facts(catalog)
    assert facts["kolobok"] == {"ru": ["Колобок — герой восточнославянской народной сказки."],
                                "en": ["He is the hero of an East Slavic folk tale."]}
    assert facts["pikachu"] == {"ru": [], "en": ["Pikachu is yellow."]}  # none states it: every fact
