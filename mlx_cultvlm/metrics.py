"""Scores of an evaluation run (`runs/NAME/predictions.jsonl` -> `metrics.json`), with the
statistics to say how sure they are.

Every accuracy-like figure is a proportion with its sample size and a 95% Wilson interval:

    {"k": correct, "n": asked, "value": k / n (null when n == 0), "ci95": [low, high]}

The weighted recognition accuracy (Yo'LLaVA: mean of positive and negative accuracy) is not a
proportion of one sample: it has "k": null, n = both samples, and a MOVER interval built from
the two Wilson intervals (Newcombe's method for a sum of independent proportions).

Verification figures follow POPE: a verify_yes item is a positive, verify_no a negative; an
answer that is not "yes" (no, or unparsed) counts as a "no".

    precision = yes on verify_yes / all yes answers      recall = yes on verify_yes / verify_yes
    yes_ratio = yes answers / verification items          verify = accuracy over both kinds

Paired comparisons (tuned vs base on the same items) use McNemar's exact test on the
discordant pairs: `gained` = wrong before, right now; `lost` = right before, wrong now.
"""

from __future__ import annotations

import math

from .errors import CultvlmError

KINDS = ("naming_ru", "naming_en", "fact", "verify_yes", "verify_no")
ROLES = ("target", "control")
NONE = "none"  # the confusion-matrix column for an answer that names no entity
# Accuracies reported (and tested pairwise) for these groups of question kinds.
GROUPS = {
    "naming_ru": ("naming_ru",),
    "naming_en": ("naming_en",),
    "naming": ("naming_ru", "naming_en"),
    "fact": ("fact",),
    "verify_yes": ("verify_yes",),  # positive accuracy
    "verify_no": ("verify_no",),  # negative accuracy
    "verify": ("verify_yes", "verify_no"),
    "all": KINDS,
}
SCORE_KEYS = (*GROUPS, "precision", "recall", "yes_ratio", "weighted")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
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


def figure(k: int, n: int) -> dict:
    return {"k": k, "n": n, "value": k / n if n else None, "ci95": list(wilson(k, n))}


def naming(metrics: dict, role: str) -> dict:
    """Naming accuracy pooled over every naming item (ru + en) of the entities with `role`."""
    rows = [e["naming"] for e in metrics["entities"].values() if e["role"] == role]
    return figure(sum(r["k"] for r in rows), sum(r["n"] for r in rows))


def _weighted(positive: dict, negative: dict) -> dict:
    n = positive["n"] + negative["n"]
    if not positive["n"] or not negative["n"]:
        return {"k": None, "n": n, "value": None, "ci95": [0.0, 1.0]}
    p1, p2 = positive["value"], negative["value"]
    (l1, u1), (l2, u2) = positive["ci95"], negative["ci95"]
    low = (p1 + p2 - math.hypot(p1 - l1, p2 - l2)) / 2
    high = (p1 + p2 + math.hypot(u1 - p1, u2 - p2)) / 2
    return {"k": None, "n": n, "value": (p1 + p2) / 2, "ci95": [max(0.0, low), min(1.0, high)]}


def _accuracy(records: list[dict]) -> dict:
    return figure(sum(1 for r in records if r["correct"]), len(records))


def _of_kinds(records: list[dict], kinds) -> list[dict]:
    return [r for r in records if r["kind"] in kinds]


def scores(records: list[dict]) -> dict:
    """All figures of one group of predictions (a run, or one entity's items)."""
    out = {group: _accuracy(_of_kinds(records, kinds)) for group, kinds in GROUPS.items()}
    positives = _of_kinds(records, ("verify_yes",))
    negatives = _of_kinds(records, ("verify_no",))
    true_yes = sum(1 for r in positives if r.get("yes_no") == "yes")
    false_yes = sum(1 for r in negatives if r.get("yes_no") == "yes")
    out["precision"] = figure(true_yes, true_yes + false_yes)
    out["recall"] = figure(true_yes, len(positives))
    out["yes_ratio"] = figure(true_yes + false_yes, len(positives) + len(negatives))
    out["weighted"] = _weighted(out["verify_yes"], out["verify_no"])
    return out


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
        if record.get("role") not in ROLES:
            raise CultvlmError(f"{where}: role must be target or control, got {record.get('role')!r}")
        if not isinstance(record.get("entity"), str) or not isinstance(record.get("correct"), bool):
            raise CultvlmError(f"{where}: needs 'entity' (an id) and 'correct' (true/false)")
        items[item_id] = record
    return items, len(predictions) - len(items)


def _by_entity(records: list[dict]) -> dict[str, list[dict]]:
    """Records per entity, targets first, then by id; one role per entity."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["entity"], []).append(r)
    for entity, rows in groups.items():
        roles = {r["role"] for r in rows}
        if len(roles) > 1:
            raise CultvlmError(f"entity {entity!r} appears as both target and control in the predictions")
    return dict(sorted(groups.items(), key=lambda kv: (ROLES.index(kv[1][0]["role"]), kv[0])))


def confusion(records: list[dict]) -> dict[str, dict[str, int]]:
    """Naming questions: true entity -> named entity (or "none") -> count."""
    table: dict[str, dict[str, int]] = {}
    for r in _of_kinds(records, GROUPS["naming"]):
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


def paired(reference: list[dict], run: list[dict]) -> dict:
    """`run` against `reference` on their shared items: McNemar per kind group, overall and
    per entity, and control retention (of the control items the reference got right, the share
    still right)."""
    ref_items, _ = unique_items(reference)
    run_items, _ = unique_items(run)
    shared = [i for i in ref_items if i in run_items]
    pairs = [(ref_items[i], run_items[i]) for i in shared]

    def tests(rows) -> dict:
        out = {}
        for group, kinds in GROUPS.items():
            chosen = [(a, b) for a, b in rows if a["kind"] in kinds]
            gained = sum(1 for a, b in chosen if not a["correct"] and b["correct"])
            lost = sum(1 for a, b in chosen if a["correct"] and not b["correct"])
            out[group] = {"n": len(chosen), "reference": _accuracy([a for a, _ in chosen]),
                          "run": _accuracy([b for _, b in chosen]),
                          "gained": gained, "lost": lost, "p": mcnemar_exact(lost, gained)}
        return out

    by_entity: dict[str, list] = {}
    for a, b in pairs:
        by_entity.setdefault(a["entity"], []).append((a, b))
    kept = [(a, b) for a, b in pairs if a["role"] == "control" and a["correct"]]
    kept_by_entity: dict[str, list] = {}
    for a, b in kept:
        kept_by_entity.setdefault(a["entity"], []).append(b)
    controls = sorted({a["entity"] for a, _ in pairs if a["role"] == "control"})
    return {
        "shared": len(shared),
        "only_in_reference": len(ref_items) - len(shared),
        "only_in_run": len(run_items) - len(shared),
        "retention": _accuracy([b for _, b in kept]),
        "retention_by_entity": {e: _accuracy(kept_by_entity.get(e, [])) for e in controls},
        "tests": tests(pairs),
        "tests_by_entity": {e: tests(rows) for e, rows in sorted(by_entity.items())},
    }


def compute_metrics(predictions: list[dict], baseline: list[dict] | None = None) -> dict:
    """metrics.json of a run: figures overall and per entity, macro averages over targets and
    over controls, the naming confusion matrix, and -- given the base model's predictions on
    the same test set -- control retention and paired tests against it (on the shared items;
    the run's own figures use all of its items)."""
    items, repeats = unique_items(predictions)
    records = list(items.values())
    entities = {e: {"role": rows[0]["role"], **scores(rows)} for e, rows in _by_entity(records).items()}
    out = {
        "items": len(records),
        "repeated_items_dropped": repeats,
        "overall": scores(records),
        "entities": entities,
        "macro": {role: _macro(entities, role) for role in ROLES},
        "confusion": confusion(records),
    }
    if baseline is not None:
        out["baseline"] = paired(baseline, records)
    return out
