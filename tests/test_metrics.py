"""metrics: Wilson intervals, McNemar's exact test, and the figures of planted runs."""

from __future__ import annotations

import hashlib
import math

import pytest

from mlx_cultvlm.errors import CultvlmError
from mlx_cultvlm.metrics import KINDS, compute_metrics, mcnemar_exact, paired, wilson


def pred(entity: str, role: str, kind: str, correct: bool, index: int, **extra) -> dict:
    """One prediction, consistent with its `correct` (as eval writes it)."""
    sha = hashlib.sha256(f"{entity}/{index}".encode()).hexdigest()
    record = {"item_id": f"{sha[:16]}:{kind}", "image": f"images/{entity}/{index}.png", "sha256": sha,
              "entity": entity, "role": role, "kind": kind, "lang": "en" if kind == "naming_en" else "ru",
              "asked_about": None, "prompt": "?", "answer": "...", "named": None, "yes_no": None,
              "correct": correct}
    if kind.startswith("naming") or kind == "fact":
        record["named"] = entity if correct else None
    if kind == "verify_yes":
        record.update(asked_about=entity, yes_no="yes" if correct else "no")
    if kind == "verify_no":
        record.update(asked_about="other", yes_no="no" if correct else "yes")
    record.update(extra)
    return record


def run_of(pattern, entities=(("cheburashka", "target"), ("mickey_mouse", "control")), images=4):
    """Every kind for every image; pattern(entity, kind, index) -> correct."""
    return [pred(e, role, kind, pattern(e, kind, i), i)
            for e, role in entities for i in range(images) for kind in KINDS]


# --- statistics -----------------------------------------------------------------------------

@pytest.mark.parametrize("k, n, low, high", [
    (0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0),
    (1, 1, 0.2065, 1.0), (81, 263, 0.2553, 0.3662),  # the second: Wikipedia's worked example
])
def test_wilson_known_values(k, n, low, high):
    got = wilson(k, n)
    assert got[0] == pytest.approx(low, abs=1e-4) and got[1] == pytest.approx(high, abs=1e-4)


def test_wilson_edges():
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(0, 7)[0] == 0.0 and wilson(7, 7)[1] == 1.0
    low, high = wilson(3, 7)
    assert low < 3 / 7 < high
    assert wilson(3, 7, z=2.576)[0] < low  # wider for 99%


def brute_mcnemar(b: int, c: int) -> float:
    """Two-sided: the probability, under Binomial(b + c, 1/2), of an outcome at least as far
    from the middle as the one seen."""
    n = b + c
    return min(1.0, sum(math.comb(n, i) for i in range(n + 1)
                        if abs(i - n / 2) >= abs(b - n / 2)) / 2 ** n)


@pytest.mark.parametrize("b, c, p", [(0, 5, 0.0625), (1, 6, 0.125), (3, 3, 1.0),
                                     (2, 10, 79 / 2048), (0, 0, 1.0), (0, 1, 1.0), (5, 0, 0.0625)])
def test_mcnemar_known_values(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, abs=1e-12)
    assert mcnemar_exact(b, c) == pytest.approx(brute_mcnemar(b, c), abs=1e-12)


def test_mcnemar_cross_checks():
    assert mcnemar_exact(2, 10) == pytest.approx(0.0386, abs=1e-4)
    for b in range(12):
        for c in range(12):
            assert mcnemar_exact(b, c) == pytest.approx(brute_mcnemar(b, c), abs=1e-12)
            assert mcnemar_exact(b, c) == mcnemar_exact(c, b)
    assert 0 <= mcnemar_exact(0, 2000) < 1e-300  # big n: exact integers, no overflow


# --- planted runs: figures count pictures --------------------------------------------------

@pytest.mark.parametrize("rule, value", [(lambda e, k, i: True, 1.0), (lambda e, k, i: False, 0.0),
                                         (lambda e, k, i: i % 2 == 0, 0.5)])
def test_all_right_all_wrong_half_right(rule, value):
    m = compute_metrics(run_of(rule))
    assert m["items"] == 48 and m["pictures"] == 8 and m["repeated_items_dropped"] == 0
    correct = round(4 * value)
    for e in ("cheburashka", "mickey_mouse"):
        figures = m["entities"][e]
        for kind in KINDS:
            assert (figures[kind]["k"], figures[kind]["n"], figures[kind]["value"]) == (correct, 4, value)
        # ru and en of one picture are one picture: n = 4 pictures of 8 answers, not 8.
        assert (figures["naming"]["k"], figures["naming"]["n"], figures["naming"]["items"]) == (correct, 4, 8)
        assert figures["weighted"]["value"] == value
        assert figures["naming"]["ci95"] == pytest.approx(list(wilson(correct, 4)))
    assert (m["overall"]["all"]["k"], m["overall"]["all"]["n"], m["overall"]["all"]["items"]) == (2 * correct, 8, 48)
    assert m["entities"]["cheburashka"]["role"] == "target"
    assert m["roles"]["target"]["naming"] == m["entities"]["cheburashka"]["naming"]
    assert m["macro"]["target"]["naming"] == {"value": value, "n": 1}
    assert m["macro"]["control"]["all"] == {"value": value, "n": 1}
    # POPE: every yes is on a verify_yes item when right, on a verify_no item when wrong; each
    # picture says yes once, so half of its verification answers are yes either way.
    pope = m["overall"]
    assert (pope["recall"]["k"], pope["recall"]["n"]) == (2 * correct, 8)
    assert (pope["yes_ratio"]["k"], pope["yes_ratio"]["n"], pope["yes_ratio"]["items"]) == (4, 8, 16)
    assert pope["precision"]["n"] == 8 and pope["precision"]["k"] == 2 * correct
    assert m["confusion"]["cheburashka"] == {k: v for k, v in
                                             {"cheburashka": 2 * correct, "none": 8 - 2 * correct}.items() if v}


def test_pope_on_a_planted_verification_set():
    # Pictures 0-7 asked verify_yes: 0-5 yes, 6 no, 7 unparsed; pictures 0-11 asked verify_no:
    # 0-3 yes (wrong), 4-11 no.
    rows = ([pred("gena", "target", "verify_yes", True, i) for i in range(6)]
            + [pred("gena", "target", "verify_yes", False, 6)]
            + [pred("gena", "target", "verify_yes", False, 7, yes_no=None)]
            + [pred("gena", "target", "verify_no", False, i) for i in range(4)]
            + [pred("gena", "target", "verify_no", True, i) for i in range(4, 12)])
    o = compute_metrics(rows)["overall"]
    assert (o["verify_yes"]["k"], o["verify_yes"]["n"]) == (6, 8)  # positive accuracy
    assert (o["verify_no"]["k"], o["verify_no"]["n"]) == (8, 12)  # negative accuracy
    # Per picture: 0-3 half right, 4-5 right, 6-7 half, 8-11 right (their one question).
    assert (o["verify"]["k"], o["verify"]["n"], o["verify"]["items"]) == (9, 12, 20)
    # Yes answers: pictures 0-3 said yes twice (once right), 4-5 once (right).
    assert (o["precision"]["k"], o["precision"]["n"], o["precision"]["items"]) == (4, 6, 10)
    assert (o["recall"]["k"], o["recall"]["n"]) == (6, 8)
    assert (o["yes_ratio"]["k"], o["yes_ratio"]["n"]) == (5, 12)
    assert o["weighted"]["value"] == pytest.approx((6 / 8 + 8 / 12) / 2)
    assert o["weighted"]["n"] == 20 and o["weighted"]["k"] is None
    low, high = o["weighted"]["ci95"]
    assert 0 < low < o["weighted"]["value"] < high < 1
    # Narrower than either part's interval: it rests on both samples.
    assert high - low < min(o["verify_yes"]["ci95"][1] - o["verify_yes"]["ci95"][0],
                            o["verify_no"]["ci95"][1] - o["verify_no"]["ci95"][0])
    assert o["naming"] == {"k": 0, "n": 0, "items": 0, "value": None, "ci95": [0.0, 1.0]}


def test_a_picture_named_in_two_languages_is_one_observation():
    """30 pictures, 27 named in both languages, 3 in Russian only: 57/60 answers, but the
    interval is the one of 28.5 right of 30 pictures -- wider than 57 of 60 independent items."""
    rows = [pred("gena", "target", kind, not (kind == "naming_en" and i < 3), i)
            for i in range(30) for kind in ("naming_ru", "naming_en")]
    fig = compute_metrics(rows)["overall"]["naming"]
    assert (fig["k"], fig["n"], fig["items"]) == (28.5, 30, 60)
    assert fig["value"] == pytest.approx(0.95)
    assert fig["ci95"] == pytest.approx(list(wilson(28.5, 30)))
    low, high = fig["ci95"]
    assert high - low > wilson(57, 60)[1] - wilson(57, 60)[0]


def negative(kind: str, index: int, **extra) -> dict:
    """A prediction on an out-of-catalog picture."""
    return {**pred("negative", "negative", kind, extra.pop("correct", True), index), "entity": None, **extra}


def test_false_positive_rate_counts_targets_named_on_controls_and_negatives():
    rows = ([pred("mickey_mouse", "control", k, True, i) for i in range(6) for k in ("naming_ru", "naming_en")]
            # control pictures 0-1: a target named in one of the two languages
            + [pred("mickey_mouse", "control", "naming_ru", False, i, named="cheburashka", target_named=True)
               for i in range(2)]
            + [negative(k, i) for i in range(10) for k in ("naming_ru", "naming_en")]
            # negatives 0-3 named a target in both languages, 4 named a control only
            + [negative(k, i, correct=False, named="gena", target_named=True)
               for i in range(4) for k in ("naming_ru", "naming_en")]
            + [negative("naming_ru", 4, correct=False, named="mickey_mouse")]
            + [pred("gena", "target", "naming_ru", True, 0, target_named=True)])  # right, not a false positive
    r = compute_metrics(rows)["restraint"]
    assert (r["false_positives_on_controls"]["k"], r["false_positives_on_controls"]["n"]) == (1, 6)
    assert (r["false_positives_on_negatives"]["k"], r["false_positives_on_negatives"]["n"]) == (4, 10)
    assert (r["false_positives"]["k"], r["false_positives"]["n"]) == (5, 16)
    assert r["false_positives"]["ci95"] == pytest.approx(list(wilson(5, 16)))
    m = compute_metrics(rows)
    assert "negative" not in m["entities"] and m["roles"]["negative"]["naming"]["n"] == 10
    assert m["overall"]["naming"]["n"] == 7  # catalog pictures only


def test_pope_settings_hedges_and_hallucinated_names():
    rows = [pred("gena", "target", "verify_yes", True, i) for i in range(4)]
    for setting, wrong in (("adversarial", 3), ("popular", 1), ("random", 0)):
        rows += [pred("gena", "target", "verify_no", i >= wrong, i, negative=setting,
                      item_id=f"{i}:verify_no:{setting}", sha256=f"{i}") for i in range(4)]
    rows += [pred("gena", "target", "naming_ru", False, i, several=True) for i in range(2)]
    rows += [pred("gena", "target", "describe", i != 0, i) for i in range(4)]
    m = compute_metrics(rows)
    assert {s: m["pope"][s]["negatives"]["k"] for s in ("adversarial", "popular", "random")} == \
        {"adversarial": 1, "popular": 3, "random": 4}
    assert m["pope"]["random"]["accuracy"]["value"] == 1.0
    assert (m["restraint"]["several_named"]["k"], m["restraint"]["several_named"]["n"]) == (2, 2)
    assert (m["restraint"]["hallucinated"]["k"], m["restraint"]["hallucinated"]["n"]) == (1, 4)


def test_confusion_and_macro():
    rows = [pred("cheburashka", "target", "naming_ru", True, 0),
            pred("cheburashka", "target", "naming_ru", False, 1, named="mickey_mouse"),
            pred("cheburashka", "target", "naming_en", False, 1, named="mickey_mouse"),
            pred("cheburashka", "target", "naming_en", False, 0),
            pred("gena", "target", "naming_ru", True, 0), pred("gena", "target", "naming_ru", True, 1),
            pred("mickey_mouse", "control", "naming_ru", True, 0),
            pred("mickey_mouse", "control", "fact", True, 0, named="mickey_mouse")]
    m = compute_metrics(rows)
    assert m["confusion"] == {"cheburashka": {"cheburashka": 1, "mickey_mouse": 2, "none": 1},
                              "gena": {"gena": 2}, "mickey_mouse": {"mickey_mouse": 1}}  # fact not counted
    assert m["macro"]["target"]["naming"] == {"value": (0.25 + 1.0) / 2, "n": 2}
    assert m["macro"]["target"]["fact"] == {"value": None, "n": 0}
    assert m["macro"]["control"]["fact"] == {"value": 1.0, "n": 1}
    assert list(m["entities"]) == ["cheburashka", "gena", "mickey_mouse"]  # targets, then controls


def test_retention_and_paired_tests_count_pictures():
    base = run_of(lambda e, k, i: e == "mickey_mouse" and not (k == "fact" and i == 3), images=4)
    # Tuned: learns cheburashka entirely; of mickey's naming answers the base got right (8, on 4
    # pictures), loses naming_ru on pictures 0 and 1; it also loses verify_no 2 (not naming) and
    # now gets fact 3 right.
    lost = {("naming_ru", 0), ("naming_ru", 1), ("verify_no", 2)}
    tuned = run_of(lambda e, k, i: e == "cheburashka" or (k, i) not in lost)
    m = compute_metrics(tuned, baseline=base)
    b = m["baseline"]
    assert (b["shared"], b["only_in_reference"], b["only_in_run"]) == (48, 0, 0)
    assert (b["retention"]["k"], b["retention"]["n"], b["retention"]["items"]) == (3, 4, 8)
    assert b["retention"]["ci95"] == pytest.approx(list(wilson(3, 4)))
    assert b["retention_by_entity"]["mickey_mouse"] == b["retention"]
    naming = b["tests"]["naming_ru"]
    assert (naming["n"], naming["gained"], naming["lost"]) == (8, 4, 2)
    assert naming["p"] == pytest.approx(mcnemar_exact(2, 4))
    assert (naming["reference"]["k"], naming["run"]["k"]) == (4, 6)
    # All questions, per picture: the 4 cheburashka pictures gained; mickey's 0, 1, 2 lost one
    # answer each, and 3 gained its fact.
    everything = b["tests"]["all"]
    assert (everything["n"], everything["gained"], everything["lost"]) == (8, 5, 3)
    assert everything["p"] == pytest.approx(mcnemar_exact(3, 5))
    learned = b["tests_by_entity"]["cheburashka"]["naming"]
    assert (learned["gained"], learned["lost"], learned["p"]) == (4, 0, pytest.approx(2 / 2 ** 4))
    mickey = b["tests_by_entity"]["mickey_mouse"]["all"]
    assert (mickey["gained"], mickey["lost"]) == (1, 3) and mickey["p"] == pytest.approx(0.625)


def test_paired_on_shared_items_only():
    base = run_of(lambda e, k, i: True)
    tuned = run_of(lambda e, k, i: True, images=5)[5:]  # lacks 5 of the base's items, has 12 it lacks
    result = paired(base, tuned)
    assert (result["shared"], result["only_in_reference"], result["only_in_run"]) == (43, 5, 12)
    assert (result["tests"]["all"]["n"], result["tests"]["all"]["items"]) == (8, 43)
    assert compute_metrics(tuned, baseline=base)["baseline"]["shared"] == 43


def test_repeated_items_keep_the_last_record():
    rows = run_of(lambda e, k, i: False)
    rows.append(dict(rows[0], correct=True, named=rows[0]["entity"]))
    m = compute_metrics(rows)
    assert m["items"] == 48 and m["repeated_items_dropped"] == 1
    assert m["overall"]["all"]["k"] == pytest.approx(1 / 6)  # one of that picture's six answers


@pytest.mark.parametrize("change, message", [({"kind": "naming"}, "kind must be"),
                                             ({"role": "known"}, "role must be"),
                                             ({"entity": None}, "'entity'"),
                                             ({"correct": "yes"}, "'correct'"),
                                             ({"item_id": None}, "item_id")])
def test_bad_records_are_one_line_errors(change, message):
    rows = run_of(lambda e, k, i: True)
    rows[3] = dict(rows[3], **change)
    with pytest.raises(CultvlmError, match=message) as e:
        compute_metrics(rows)
    assert "\n" not in e.value.message


def test_entity_with_two_roles_is_refused():
    rows = [pred("gena", "target", "fact", True, 0), pred("gena", "control", "fact", True, 1)]
    with pytest.raises(CultvlmError, match="both target and control"):
        compute_metrics(rows)
