"""The demo's drawn characters: a valid catalog, honest look-alikes, deterministic pictures."""

from __future__ import annotations

import json
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mlx_cultvlm.characters import (DEMO_CATALOG, PAIRS, PARTS, canonical_mask, feature_difference, render,
                                    write_images)
from mlx_cultvlm.data.catalog import load_catalog
from mlx_cultvlm.data.check import check_images
from mlx_cultvlm.score import AnswerScorer

REAL_CATALOG = Path(__file__).resolve().parents[1] / "data" / "entities.json"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    path = tmp_path_factory.mktemp("catalog") / "entities.json"
    path.write_text(json.dumps(DEMO_CATALOG, ensure_ascii=False), encoding="utf-8")
    return load_catalog(path)


def test_catalog_loads_with_targets_controls_and_mutual_look_alikes(catalog):
    roles = Counter(e.role for e in catalog.values())
    assert roles == {"target": 6, "control": 3}
    mutual = {frozenset((e.id, c)) for e in catalog.values() for c in e.confusable_with
              if e.id in catalog[c].confusable_with}
    assert len(mutual) >= 2
    kinds = {tuple(sorted(catalog[i].role for i in pair)) for pair in mutual}
    assert ("control", "target") in kinds and ("target", "target") in kinds
    scorer = AnswerScorer(catalog)
    for e in catalog.values():
        assert len(e.facts["ru"]) >= 3 and len(e.facts["en"]) >= 3
        for lang in ("ru", "en"):
            origin, *drawn = e.facts[lang]
            assert scorer.states_origin(origin, e.id), (e.id, lang)  # the fact questions are graded on it
            # The rest describe the drawings, as the demo's, and state no origin.
            assert all("cultvlm demo" in fact and not scorer.states_origin(fact, e.id) for fact in drawn)
    assert set(catalog) == set(PARTS)


@pytest.mark.skipif(not REAL_CATALOG.is_file(), reason="no data/entities.json")
def test_ids_and_names_are_the_real_catalogs(catalog):
    real = load_catalog(REAL_CATALOG)
    for e in catalog.values():
        assert e.id in real
        assert e.names == real[e.id].names  # the answer scorer matches these names
        # The real origin, less the studio (which never counts for the fact question).
        assert {"work", "author"} <= set(e.origin) and all(real[e.id].origin.get(k) == v for k, v in e.origin.items())


def test_the_held_out_design_is_another_drawing_of_the_same_character():
    """Design 1 is not a transform of design 0: other proportions (the silhouettes overlap
    less than a scaled copy would), ink outlines and a shadow (other pixels)."""
    from mlx_cultvlm.characters import INK

    for e in PARTS:
        old, new = (np.asarray(render(e, None, canonical=True, design=d), float) for d in (0, 1))
        masks = [(np.abs(p - 250).sum(axis=2) > 30) for p in (old, new)]
        iou = (masks[0] & masks[1]).sum() / (masks[0] | masks[1]).sum()
        assert iou < 0.85, (e, iou)
        assert np.abs(new - old).mean() > 8, e
        inked = [(np.abs(p - np.array(INK)).sum(axis=2) < 40).mean() for p in (old, new)]
        assert inked[1] > inked[0] + 0.005, (e, inked)  # the outlines: at least 0.5% of the frame more ink
    # The demo's pictures of design 0 are what they always were (the shipped base learned from them).
    a = render("cheburashka", np.random.default_rng([0, zlib.crc32(b"cheburashka"), 0]))
    b = render("cheburashka", np.random.default_rng([0, zlib.crc32(b"cheburashka"), 0]), design=0)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(KeyError, match="no design 2"):
        render("cheburashka", None, canonical=True, design=2)


def test_look_alikes_share_body_and_palette_and_differ_in_one_or_two_features(catalog):
    pairs = {frozenset((e.id, c)) for e in catalog.values() for c in e.confusable_with}
    assert pairs == {frozenset(p) for p in PAIRS}
    for a, b in PAIRS:
        assert PARTS[a].body == PARTS[b].body and PARTS[a].palette == PARTS[b].palette
        assert 1 <= len(feature_difference(a, b)) <= 2, (a, b)
    specs = [(p.body, p.palette, p.features) for p in PARTS.values()]
    assert len(set(specs)) == len(specs)  # every character is its own combination


def test_no_body_colour_belongs_to_one_character():
    worn = Counter(p.palette[0] for p in PARTS.values())
    assert min(worn.values()) >= 2, worn


@pytest.mark.parametrize("size", [112, 168])
def test_render_is_deterministic_and_differs_across_seeds(size):
    for entity_id in PARTS:
        a = render(entity_id, np.random.default_rng(7), size)
        b = render(entity_id, np.random.default_rng(7), size)
        c = render(entity_id, np.random.default_rng(8), size)
        assert a.mode == "RGB" and a.size == (size, size)
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert not np.array_equal(np.asarray(a), np.asarray(c))


def mean_colours(entity_id: str, seeds) -> np.ndarray:
    return np.array([np.asarray(render(entity_id, np.random.default_rng([s, zlib.crc32(entity_id.encode())]), 112))
                     .reshape(-1, 3).mean(0) for s in seeds])


def test_mean_colour_cannot_tell_look_alikes_apart():
    """A nearest-centroid classifier on the mean RGB of a picture, trained on 40 pictures per
    character and tested on 40 others, is near chance on every look-alike pair."""
    for a, b in PAIRS:
        train_a, train_b = mean_colours(a, range(40)), mean_colours(b, range(40))
        test_a, test_b = mean_colours(a, range(40, 80)), mean_colours(b, range(40, 80))
        ca, cb = train_a.mean(0), train_b.mean(0)

        def says_a(x):
            return np.linalg.norm(x - ca, axis=1) < np.linalg.norm(x - cb, axis=1)

        accuracy = (says_a(test_a).sum() + (~says_a(test_b)).sum()) / 80
        assert accuracy <= 0.70, (a, b, accuracy)


def test_look_alikes_differ_in_their_canonical_drawings():
    for a, b in PAIRS:
        ma, mb = canonical_mask(a), canonical_mask(b)
        assert (ma ^ mb).sum() >= 0.03 * (ma | mb).sum(), (a, b)  # a part sticks out of one only
        ia = np.asarray(render(a, None, canonical=True), dtype=int)
        ib = np.asarray(render(b, None, canonical=True), dtype=int)
        assert (np.abs(ia - ib).sum(-1) > 60).sum() >= 0.03 * (ma | mb).sum(), (a, b)


def test_write_images_layout_is_what_data_check_reads(tmp_path, catalog):
    written = write_images(tmp_path / "a", per_entity=3, seed=1)
    assert set(written) == set(PARTS)
    for entity_id, paths in written.items():
        assert [p.relative_to(tmp_path / "a").as_posix() for p in paths] == \
            [f"{entity_id}/{n:04d}.png" for n in range(3)]
    again = write_images(tmp_path / "b", per_entity=3, seed=1)
    other = write_images(tmp_path / "c", ids=["kolobok"], per_entity=3, seed=2)
    assert all(p.read_bytes() == q.read_bytes() for e in PARTS for p, q in zip(written[e], again[e]))
    assert all(p.read_bytes() != q.read_bytes() for p, q in zip(written["kolobok"], other["kolobok"]))
    records = check_images(tmp_path / "a", catalog)
    assert len(records) == 3 * len(PARTS)
    assert all(r.status == "ok" for r in records), [r.status for r in records if r.status != "ok"]
