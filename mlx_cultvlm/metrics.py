"""Scores of an evaluation run (`runs/NAME/predictions.jsonl` -> `metrics.json`), with the
statistics to say how sure they are.

The unit is the picture. A picture asked in two languages (or about three negatives) is one
observation, not two: every accuracy-like figure is the mean over pictures of each picture's
share of right answers, with n = pictures, `items` = the answers behind it, and a 95% Wilson
interval on n pictures:

    {"k": sum of per-picture shares, "n": pictures, "items": answers, "value": k / n (null when
     n == 0), "ci95": [low, high]}

With one answer per picture k counts right answers exactly; with several the interval is the one
a picture-level yes/no would give at the same share, which is wider (never narrower) than the
truth when the answers of one picture agree less than always.

The weighted recognition accuracy (Yo'LLaVA: mean of positive and negative accuracy) is not a
proportion of one sample: it has "k": null, n = pictures of both samples, and a MOVER interval
built from the two Wilson intervals (Newcombe's method for a sum of independent proportions).

Verification figures follow POPE: a verify_yes item is a positive, verify_no a negative; an
answer that is not "yes" (no, or unparsed) counts as a "no". verify_no items are asked in POPE's
three settings (`negative`: adversarial, popular, random), each reported on its own.

    precision = yes on verify_yes / all yes answers      recall = yes on verify_yes / verify_yes
    yes_ratio = yes answers / verification items          verify = accuracy over both kinds

Restraint: `false_positives` is the share of naming answers that put forward a target on a
control picture or on an out-of-catalog picture (role "negative"); `several_named` the share of
naming answers that name several entities (a hedge or a list, graded wrong); `hallucinated` the
share of descriptions that name an entity that is not in the picture.

Paired comparisons (tuned vs base on the same items) count pictures: `gained` = pictures whose
share of right answers rose, `lost` = fell; the exact sign test on them (McNemar's exact test
when each picture has one answer).
"""

from __future__ import annotations

import math
import statistics

from .errors import CultvlmError

KINDS = ("naming_ru", "naming_en", "fact", "verify_yes", "verify_no", "describe")
ROLES = ("target", "control")
NEGATIVE = "negative"  # the role of an out-of-catalog picture (entity None)
NEGATIVE_SETTINGS = ("adversarial", "popular", "random")
NONE = "none"  # the confusion-matrix column for an answer that names no entity
NAMING = ("naming_ru", "naming_en")
# Accuracies reported (and tested pairwise) for these groups of items.
GROUPS = {
    "naming_ru": lambda r: r["kind"] == "naming_ru",
    "naming_en": lambda r: r["kind"] == "naming_en",
    "naming": lambda r: r["kind"] in NAMING,
    "fact": lambda r: r["kind"] == "fact",
    "fact_ru": lambda r: r["kind"] == "fact" and r.get("lang") == "ru",
    "fact_en": lambda r: r["kind"] == "fact" and r.get("lang") == "en",
    "verify_yes": lambda r: r["kind"] == "verify_yes",  # positive accuracy
    "verify_no": lambda r: r["kind"] == "verify_no",  # negative accuracy
    "verify": lambda r: r["kind"] in ("verify_yes", "verify_no"),
    "verify_ru": lambda r: r["kind"] in ("verify_yes", "verify_no") and r.get("lang") == "ru",
    "verify_en": lambda r: r["kind"] in ("verify_yes", "verify_no") and r.get("lang") == "en",
    "describe": lambda r: r["kind"] == "describe",  # no name that is not in the picture
    "all": lambda r: True,
}
SCORE_KEYS = (*GROUPS, "precision", "recall", "yes_ratio", "weighted")


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials. n == 0 gives (0.0, 1.0): with no
    observation every value is possible."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The exact ends at k == 0 and k == n, not a rounding error away from them.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return (low, high)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar test: under no change, each of the b + c discordant pairs goes
    either way with probability 1/2. No discordant pair gives 1.0."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)  # exact integer arithmetic until the last division


def picture(record: dict) -> str:
    """The picture an item asks about: the unit every figure counts."""
    return record.get("sha256") or record["item_id"].split(":")[0]


def by_picture(records: list[dict], hit=lambda r: r["correct"]) -> dict[str, float]:
    """Each picture's share of records that `hit`."""
    outcomes: dict[str, list[bool]] = {}
    for r in records:
        outcomes.setdefault(picture(r), []).append(bool(hit(r)))
    return {p: sum(v) / len(v) for p, v in outcomes.items()}


def figure(k: float, n: int, items: int | None = None) -> dict:
    if abs(k - round(k)) < 1e-9:  # a whole count stays an integer (float sums of shares drift)
        k = int(round(k))
    return {"k": k, "n": n, "items": n if items is None else items, "value": k / n if n else None,
            "ci95": list(wilson(k, n))}


def proportion(records: list[dict], hit=lambda r: r["correct"]) -> dict:
    """The share of `records` that `hit`, counted per picture (see the module docstring)."""
    shares = by_picture(records, hit)
    return figure(sum(shares.values()), len(shares), len(records))


def naming(metrics: dict, role: str) -> dict:
    """Naming accuracy (ru + en, per picture) of the pictures of the entities with `role`."""
    return metrics["roles"][role]["naming"]


def _weighted(positive: dict, negative: dict) -> dict:
    n = positive["n"] + negative["n"]
    if not positive["n"] or not negative["n"]:
        return {"k": None, "n": n, "value": None, "ci95": [0.0, 1.0]}
    p1, p2 = positive["value"], negative["value"]
    (l1, u1), (l2, u2) = positive["ci95"], negative["ci95"]
    low = (p1 + p2 - math.hypot(p1 - l1, p2 - l2)) / 2
    high = (p1 + p2 + math.hypot(u1 - p1, u2 - p2)) / 2
    return {"k": None, "n": n, "value": (p1 + p2) / 2, "ci95": [max(0.0, low), min(1.0, high)]}


def scores(records: list[dict]) -> dict:
    """All figures of one group of predictions (a run, or one entity's items)."""
    out = {group: proportion([r for r in records if chosen(r)]) for group, chosen in GROUPS.items()}
    positives = [r for r in records if r["kind"] == "verify_yes"]
    verification = [r for r in records if r["kind"] in ("verify_yes", "verify_no")]
    said_yes = [r for r in verification if r.get("yes_no") == "yes"]
    out["precision"] = proportion(said_yes, lambda r: r["kind"] == "verify_yes")
    out["recall"] = proportion(positives, lambda r: r.get("yes_no") == "yes")
    out["yes_ratio"] = proportion(verification, lambda r: r.get("yes_no") == "yes")
    out["weighted"] = _weighted(out["verify_yes"], out["verify_no"])
    return out


def pope(records: list[dict]) -> dict:
    """Per POPE setting: the accuracy on its negatives, and on them with every positive."""
    positives = [r for r in records if r["kind"] == "verify_yes"]
    out = {}
    for setting in NEGATIVE_SETTINGS:
        negatives = [r for r in records if r["kind"] == "verify_no" and r.get("negative") == setting]
        out[setting] = {"negatives": proportion(negatives), "accuracy": proportion(positives + negatives),
                        "yes_ratio": proportion(positives + negatives, lambda r: r.get("yes_no") == "yes")}
    return out


def restraint(records: list[dict]) -> dict:
    """False positives, hedges and hallucinated names (see the module docstring)."""
    named = [r for r in records if r["kind"] in NAMING]
    target_named = lambda r: bool(r.get("target_named"))  # noqa: E731
    return {
        "false_positives": proportion([r for r in named if r["role"] in ("control", NEGATIVE)], target_named),
        "false_positives_on_controls": proportion([r for r in named if r["role"] == "control"], target_named),
        "false_positives_on_negatives": proportion([r for r in named if r["role"] == NEGATIVE], target_named),
        "several_named": proportion(named, lambda r: bool(r.get("several"))),
        "hallucinated": proportion([r for r in records if r["kind"] == "describe"], lambda r: not r["correct"]),
    }


def unique_items(predictions: list[dict]) -> tuple[dict[str, dict], int]:
    """Predictions by item_id, checked; a repeated item (an eval resumed over it) keeps its
    last record. Returns (items, number of repeats dropped)."""
    items: dict[str, dict] = {}
    for number, record in enumerate(predictions, 1):
        item_id = record.get("item_id")
        where = f"prediction #{number} ({item_id})"
        if not isinstance(item_id, str) or not item_id:
            raise CultvlmError(f"prediction #{number}: missing 'item_id'")
        if record.get("kind") not in KINDS:
            raise CultvlmError(f"{where}: kind must be one of {', '.join(KINDS)}, got {record.get('kind')!r}")
        if record.get("role") not in (*ROLES, NEGATIVE):
            raise CultvlmError(f"{where}: role must be target, control or negative, got {record.get('role')!r}")
        entity_ok = record.get("entity") is None if record["role"] == NEGATIVE else isinstance(record.get("entity"), str)
        if not entity_ok or not isinstance(record.get("correct"), bool):
            raise CultvlmError(f"{where}: needs 'entity' (an id; null for a negative) and 'correct' (true/false)")
        items[item_id] = record
    return items, len(predictions) - len(items)


def _by_entity(records: list[dict]) -> dict[str, list[dict]]:
    """Records per catalog entity, targets first, then by id; one role per entity."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        if r["role"] != NEGATIVE:
            groups.setdefault(r["entity"], []).append(r)
    for entity, rows in groups.items():
        roles = {r["role"] for r in rows}
        if len(roles) > 1:
            raise CultvlmError(f"entity {entity!r} appears as both target and control in the predictions")
    return dict(sorted(groups.items(), key=lambda kv: (ROLES.index(kv[1][0]["role"]), kv[0])))


def confusion(records: list[dict]) -> dict[str, dict[str, int]]:
    """Naming questions: true entity -> named entity (or "none") -> count."""
    table: dict[str, dict[str, int]] = {}
    for r in records:
        if r["kind"] in NAMING and r["role"] != NEGATIVE:
            row = table.setdefault(r["entity"], {})
            named = r.get("named") or NONE
            row[named] = row.get(named, 0) + 1
    return {true: dict(sorted(row.items())) for true, row in sorted(table.items())}


def _macro(entities: dict[str, dict], role: str) -> dict:
    """Mean of per-entity values; n = entities that have a value."""
    out = {}
    for key in SCORE_KEYS:
        values = [e[key]["value"] for e in entities.values()
                  if e["role"] == role and e[key]["value"] is not None]
        out[key] = {"value": sum(values) / len(values) if values else None, "n": len(values)}
    return out


def sign_test(pairs: list[tuple[dict, dict]]) -> dict:
    """`run` against `reference` on paired items, per picture: the pictures whose share of right
    answers rose (gained) and fell (lost), and the exact sign test on them."""
    before = by_picture([a for a, _ in pairs])
    after = by_picture([b for _, b in pairs])
    gained = sum(1 for p in before if after[p] > before[p])
    lost = sum(1 for p in before if after[p] < before[p])
    return {"n": len(before), "items": len(pairs), "reference": proportion([a for a, _ in pairs]),
            "run": proportion([b for _, b in pairs]), "gained": gained, "lost": lost,
            "p": mcnemar_exact(lost, gained)}


def paired(reference: list[dict], run: list[dict]) -> dict:
    """`run` against `reference` on their shared items: sign tests per group, overall and per
    entity, and control retention (of the control naming answers the reference got right, the
    share still right)."""
    ref_items, _ = unique_items(reference)
    run_items, _ = unique_items(run)
    shared = [i for i in ref_items if i in run_items]
    pairs = [(ref_items[i], run_items[i]) for i in shared]

    def tests(rows) -> dict:
        return {group: sign_test([(a, b) for a, b in rows if chosen(a)]) for group, chosen in GROUPS.items()}

    by_entity: dict[str, list] = {}
    for a, b in pairs:
        if a["role"] != NEGATIVE:
            by_entity.setdefault(a["entity"], []).append((a, b))
    kept = [b for a, b in pairs if a["role"] == "control" and a["kind"] in NAMING and a["correct"]]
    controls = sorted({a["entity"] for a, _ in pairs if a["role"] == "control"})
    return {
        "shared": len(shared),
        "only_in_reference": len(ref_items) - len(shared),
        "only_in_run": len(run_items) - len(shared),
        "retention": proportion(kept),
        "retention_by_entity": {e: proportion([b for b in kept if b["entity"] == e]) for e in controls},
        "tests": tests(pairs),
        "tests_by_entity": {e: tests(rows) for e, rows in sorted(by_entity.items())},
    }


def compute_metrics(predictions: list[dict], baseline: list[dict] | None = None) -> dict:
    """metrics.json of a run: figures overall, per role and per entity, macro averages over
    targets and over controls, POPE's settings, restraint (false positives, hedges, hallucinated
    names), the out-of-catalog pictures, the naming confusion matrix, and -- given the base
    model's predictions on the same test set -- control retention and paired tests against it
    (on the shared items; the run's own figures use all of its items)."""
    items, repeats = unique_items(predictions)
    records = list(items.values())
    catalog_records = [r for r in records if r["role"] != NEGATIVE]
    entities = {e: {"role": rows[0]["role"], **scores(rows)} for e, rows in _by_entity(records).items()}
    out = {
        "items": len(records),
        "pictures": len({picture(r) for r in records}),
        "repeated_items_dropped": repeats,
        "overall": scores(catalog_records),
        "roles": {role: scores([r for r in records if r["role"] == role]) for role in (*ROLES, NEGATIVE)},
        "entities": entities,
        "macro": {role: _macro(entities, role) for role in ROLES},
        "pope": pope(records),
        "restraint": restraint(records),
        "confusion": confusion(records),
    }
    if baseline is not None:
        out["baseline"] = paired(baseline, records)
    return out


# --- over seeds (a series' runs) ---------------------------------------------------------

def t_quantile(df: int, level: float = 0.95) -> float:
    from scipy.stats import t  # deferred: scipy takes a second to import, for a series report only

    return float(t.ppf(1 - (1 - level) / 2, df))


def summarize(figures: list[dict]) -> dict:
    """Across the runs (seeds) of a group: the mean of the per-run values with a Student-t
    interval (two or more values), and the pooled figure (all answers together) with its
    Wilson interval."""
    values = [f["value"] for f in figures if f["n"]]
    m = len(values)
    mean = sum(values) / m if m else None
    half = ci = None
    if m >= 2:
        half = t_quantile(m - 1) * statistics.stdev(values) / math.sqrt(m)
        ci = [max(0.0, mean - half), min(1.0, mean + half)]
    pooled = figure(sum(f["k"] for f in figures), sum(f["n"] for f in figures))
    return {"runs": len(figures), "values": values, "mean": mean, "t_half_width": half, "t_ci95": ci,
            "pooled": pooled}


def difference(a: list[dict], b: list[dict]) -> dict:
    """Seed-matched difference of values (a - b): its mean and Student-t interval."""
    diffs = [x["value"] - y["value"] for x, y in zip(a, b) if x["n"] and y["n"]]
    m = len(diffs)
    mean = sum(diffs) / m if m else None
    half = t_quantile(m - 1) * statistics.stdev(diffs) / math.sqrt(m) if m >= 2 else None
    return {"differences": diffs, "mean": mean, "t_half_width": half,
            "t_ci95": [mean - half, mean + half] if half is not None else None}


def _only(items: dict, role: str) -> list[dict]:
    return [r for r in items.values() if r["role"] == role]


def paired_tests(reference: dict, run: dict) -> dict:
    """`run` against `reference` on their shared items (metrics.paired): naming on targets and
    on controls (sign tests on pictures), all questions, and control retention."""
    both = paired(list(reference["items"].values()), list(run["items"].values()))
    return {"reference": reference["name"], "run": run["name"], "shared": both["shared"],
            "retention": both["retention"], "all": both["tests"]["all"],
            "target_naming": paired(_only(reference["items"], "target"), _only(run["items"], "target"))["tests"]["naming"],
            "control_naming": paired(_only(reference["items"], "control"), _only(run["items"], "control"))["tests"]["naming"]}

