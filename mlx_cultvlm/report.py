"""`cultvlm compare RUN... --out reports/NAME`: a report on one or more evaluation runs.

Runs are labelled by their folder names; the first is the reference that the others are tested
against (base vs tuned, 3B vs 7B, rank 8 vs rank 32). The report folder holds

    report.md       tables, figures and an analysis written from the numbers only
    report.html     the same, self-contained (figures and thumbnails embedded as base64)
    metrics.json    every number the pages show
    *.png           naming accuracy per entity, confusion matrices, loss curves, retention
    gallery/        thumbnails of a few test images per entity (referenced by report.md)

Every figure is recomputed from predictions.jsonl (the record of what the model said) on the
items all runs share; runs over different items are compared on the shared ones, and runs that
share none are refused. A run's metrics.json that disagrees with its predictions is noted.
Nothing in a run folder is modified: eval may still be appending to it.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
from pathlib import Path

import click
from PIL import Image, ImageOps

from .data.catalog import load_catalog
from .errors import CultvlmError
from .files import check_out_apart, check_replaceable, partial_folder, read_jsonl, replace_folder, write_json
from .metrics import KINDS, NEGATIVE_SETTINGS, NONE, ROLES, compute_metrics, paired, unique_items

ALPHA = 0.05
GALLERY_PER_ENTITY = 3
THUMB_SIDE = 160
TOP_CONFUSIONS = 5
LABELS = {
    "naming_ru": "naming (ru)", "naming_en": "naming (en)", "naming": "naming (ru+en)",
    "fact": "fact (ru+en)", "fact_ru": "fact (ru)", "fact_en": "fact (en)",
    "verify_yes": "positive accuracy (verify yes)", "verify_no": "negative accuracy (verify no)",
    "verify": "verification accuracy", "verify_ru": "verification (ru)", "verify_en": "verification (en)",
    "describe": "descriptions without a wrong name", "all": "all questions",
    "precision": "precision (POPE)", "recall": "recall (POPE)",
    "yes_ratio": "yes-ratio (POPE)", "weighted": "weighted recognition accuracy (Yo'LLaVA)",
}
RESTRAINT_LABELS = {
    "false_positives": "false positives: a target named on a control or out-of-catalog picture",
    "false_positives_on_controls": "... on control pictures",
    "false_positives_on_negatives": "... on out-of-catalog pictures",
    "several_named": "naming answers that name several entities (graded wrong)",
    "hallucinated": "descriptions that name an entity not in the picture",
}
MACRO_KEYS = ("naming", "fact", "verify", "weighted", "all")
TESTED = ("naming", "fact", "verify", "describe", "all")  # the groups the analysis restates
UNITS = ("Accuracies are counted per picture: k/n = value [95% Wilson interval], n = pictures (a picture asked "
         "in two languages, or about three negatives, counts once; k sums each picture's share of right answers).")


# --- reading run folders -----------------------------------------------------------------

def load_run(folder: Path) -> dict:
    info_path, predictions_path = folder / "run.json", folder / "predictions.jsonl"
    if not info_path.is_file() or not predictions_path.is_file():
        raise CultvlmError(f"{folder}: not a run folder (needs run.json and predictions.jsonl)")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        metrics_path = folder / "metrics.json"
        stored = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else None
    except ValueError as e:
        raise CultvlmError(f"{folder}: run.json or metrics.json is not valid JSON ({e})") from None
    try:
        items, _ = unique_items(read_jsonl(predictions_path, repair=False))
    except CultvlmError as e:
        if e.message.startswith(str(predictions_path)):
            raise
        raise CultvlmError(f"{predictions_path}: {e.message}") from None
    if not items:
        raise CultvlmError(f"{predictions_path}: no predictions")
    return {"name": folder.name, "dir": folder, "info": info, "items": items, "stored_metrics": stored}


def _train_log(run: dict) -> list[dict]:
    """The LoRA training log behind a run: its adapter's, or the one `fuse` copied into the
    fused model it evaluated."""
    adapter, model = run["info"].get("adapter"), run["info"].get("model")
    folders = [Path(adapter), run["dir"] / adapter] if adapter else []  # as given (cwd), or beside the run
    for folder in [Path(model), run["dir"] / model] if model else []:
        folders.append(folder)
        record = folder / "cultvlm_fuse.json"  # which adapter fuse merged, if its log was not copied
        if record.is_file():
            try:
                folders.append(Path(json.loads(record.read_text(encoding="utf-8"))["adapter"]))
            except (ValueError, KeyError, TypeError):
                pass  # an unreadable record: no curves, not a failed report
    for folder in folders:
        if (folder / "train_log.jsonl").is_file():
            return [r for r in read_jsonl(folder / "train_log.jsonl", repair=False) if "step" in r]
    return []


# --- numbers as text: every one with its sample size -------------------------------------

def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def fig_text(fig: dict) -> str:
    if not fig["n"] or fig["value"] is None:
        return f"n/a (n = {fig['n']})"
    low, high = fig["ci95"]
    interval = f"{pct(fig['value'])} [{100 * low:.1f}, {100 * high:.1f}]"
    if fig["k"] is None:  # weighted accuracy: not a count
        return f"{interval} (n = {fig['n']})"
    return f"{count_text(fig)} = {interval}"


def count_text(fig: dict) -> str:
    """k/n, k to one decimal when pictures count shares of their answers."""
    k = fig["k"] if isinstance(fig["k"], int) else f"{fig['k']:.1f}"
    return f"{k}/{fig['n']}"


def p_text(p: float) -> str:
    return f"{p:.4g}"


def change(test: dict) -> str:
    if not test["n"]:
        return "no paired items"
    if test["p"] < ALPHA:
        return "rose significantly" if test["gained"] > test["lost"] else "fell significantly"
    return "not significant"


def entity_verdict(role: str, test: dict) -> str:
    verdict = change(test)
    if verdict == "rose significantly" and role == "target":
        return "learned"
    if verdict == "fell significantly" and role == "control":
        return "forgotten"
    return verdict


# --- figures (matplotlib's object API: Agg, no global pyplot state) ------------------------

def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _bars(ax, labels: list[str], series: dict[str, list[dict]], first_colour: int = 0):
    """Grouped bars of proportions with Wilson error bars; one series per run, each run in the
    same colour in every figure."""
    width = 0.8 / max(len(series), 1)
    for i, (name, figs) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        values = [f["value"] or 0.0 for f in figs]
        errors = [[v - f["ci95"][0] if f["n"] else 0 for v, f in zip(values, figs)],
                  [f["ci95"][1] - v if f["n"] else 0 for v, f in zip(values, figs)]]
        ax.bar(xs, values, width, yerr=errors, capsize=2, label=name, color=f"C{first_colour + i}")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the plot, never over a bar


def plot_naming(runs: list[dict], entities: list[str], path: Path) -> None:
    first = runs[0]["metrics"]["entities"]
    labels = [f"{e} (n={first[e]['naming']['n']})" for e in entities]
    fig = _new_figure(max(6, 0.6 * len(entities) * max(1, len(runs) / 2)), 4.5)
    ax = fig.add_subplot()
    _bars(ax, labels, {r["name"]: [r["metrics"]["entities"][e]["naming"] for e in entities] for r in runs})
    ax.set_ylabel("naming accuracy (ru+en)")
    ax.set_title("Naming accuracy per entity, 95% Wilson intervals")
    fig.savefig(path)


def plot_confusion(runs: list[dict], rows: list[str], columns: list[str], path: Path) -> None:
    side = 1.5 + 0.4 * len(columns)
    fig = _new_figure(side * len(runs), 1.5 + 0.4 * len(rows))
    for i, run in enumerate(runs):
        table = run["metrics"]["confusion"]
        counts = [[table.get(r, {}).get(c, 0) for c in columns] for r in rows]
        shares = [[v / max(sum(row), 1) for v in row] for row in counts]
        ax = fig.add_subplot(1, len(runs), i + 1)
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for y, row in enumerate(counts):
            for x, v in enumerate(row):
                if v:
                    ax.text(x, y, str(v), ha="center", va="center", fontsize=7,
                            color="white" if shares[y][x] > 0.5 else "black")
        ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
        ax.set_yticks(range(len(rows)), rows if i == 0 else [""] * len(rows), fontsize=7)
        ax.set_xlabel("named")
        if i == 0:
            ax.set_ylabel("true entity")
        ax.set_title(f"{run['name']} (naming answers)", fontsize=9)
    fig.savefig(path)


def plot_loss(logs: dict[str, list[dict]], path: Path) -> None:
    fig = _new_figure(7, 4)
    ax = fig.add_subplot()
    for i, (name, log) in enumerate(logs.items()):
        colour = f"C{i}"
        ax.plot([r["step"] for r in log], [r["loss"] for r in log], color=colour, alpha=0.5, label=f"{name} train")
        val = [r for r in log if r.get("val_loss") is not None]
        if val:  # drawn over the noisy training curve, in black-edged markers, so it stays visible
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o--", color=colour, markersize=7,
                    markeredgecolor="black", linewidth=2, zorder=3, label=f"{name} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")  # the first steps are ten times the last: a linear axis hides the tail
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title("Adapter training loss")
    fig.savefig(path)


def plot_retention(comparisons: list[dict], controls: list[str], path: Path) -> None:
    labels = ["all controls", *controls]
    first = comparisons[0]
    labels = [f"{label} (n={fig['n']})" for label, fig in
              zip(labels, [first["retention"], *[first["retention_by_entity"][c] for c in controls]])]
    fig = _new_figure(max(5, 0.8 * len(labels)), 4)
    ax = fig.add_subplot()
    _bars(ax, labels, {c["run"]: [c["retention"], *[c["retention_by_entity"][e] for e in controls]]
                       for c in comparisons}, first_colour=1)
    ax.set_ylabel(f"share of {first['reference']}'s right answers still right")
    ax.set_title(f"Control retention vs {first['reference']}, 95% Wilson intervals")
    fig.savefig(path)


# --- gallery -------------------------------------------------------------------------------

def _thumbnail(record: dict, runs: list[dict], path: Path) -> bool:
    image = Path(record["image"])
    # A relative path is relative to where eval ran (usually here), else to a run's dataset.
    candidates = [image] if image.is_absolute() else [
        image, *(Path(r["info"].get("dataset") or ".") / image for r in runs)]
    for candidate in candidates:
        if candidate.is_file():
            try:
                with Image.open(candidate) as img:
                    thumb = ImageOps.exif_transpose(img).convert("RGB")
                thumb.thumbnail((THUMB_SIDE, THUMB_SIDE))
                thumb.save(path, quality=85)
                return True
            except OSError:
                return False
    return False


def gallery(runs: list[dict], entities: list[str], folder: Path) -> list[list]:
    """Table rows: entity, thumbnail, question, then each run's answer with right/wrong. A few
    images per entity, the same ones for every run (the first by item id)."""
    (folder / "gallery").mkdir()
    reference = runs[0]["items"]
    rows = []
    for entity in entities:
        by_image: dict[str, list[dict]] = {}
        for item_id in sorted(reference):
            record = reference[item_id]
            if record["entity"] == entity:
                by_image.setdefault(record.get("sha256") or record["image"], []).append(record)
        for records in list(by_image.values())[:GALLERY_PER_ENTITY]:
            # One question per picture: naming in Russian if it was asked.
            question = min(records, key=lambda r: KINDS.index(r["kind"]))
            name = f"gallery/{len(rows):03d}.jpg"
            picture = ("img", name) if _thumbnail(question, runs, folder / name) else "(image not found)"
            answers = [("right: " if r["items"][question["item_id"]]["correct"] else "wrong: ")
                       + _short(r["items"][question["item_id"]].get("answer", "")) for r in runs]
            rows.append([entity, picture, f"{question['kind']}: {_short(question.get('prompt', ''))}", *answers])
    return rows


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


# --- the document: blocks rendered to Markdown and to HTML --------------------------------
# ("h2"|"h3", text), ("p", text), ("ul", [text]), ("img", file, caption),
# ("table", header, rows); a table cell is text or ("img", file).

def to_markdown(blocks: list[tuple]) -> str:
    def cell(value) -> str:
        if isinstance(value, tuple):
            return f"![]({value[1]})"
        return str(value).replace("|", "\\|").replace("\n", " ")

    out = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + block[1])
        elif kind == "p":
            out.append(block[1])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})")
        elif kind == "table":
            header, rows = block[1], block[2]
            lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def to_html(blocks: list[tuple], folder: Path, title: str) -> str:
    def embed(name: str) -> str:
        mime = "image/png" if name.endswith(".png") else "image/jpeg"
        data = base64.b64encode((folder / name).read_bytes()).decode("ascii")
        return f'<img src="data:{mime};base64,{data}" alt="{html.escape(name)}">'

    def cell(value) -> str:
        return embed(value[1]) if isinstance(value, tuple) else html.escape(str(value))

    out = [f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:1400px;margin:auto;padding:1em}"
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
           "font-size:13px;vertical-align:top}img{max-width:100%}</style></head><body>"]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "img":
            out.append(f"<figure>{embed(block[1])}<figcaption>{html.escape(block[2])}</figcaption></figure>")
        elif kind == "table":
            out.append("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in block[1]) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>"
                                 for row in block[2]) + "</table>")
    out.append("</body></html>\n")
    return "\n".join(out)


# --- the report ----------------------------------------------------------------------------

def _catalog(path: str | None, runs: list[dict]) -> dict:
    if path:
        return load_catalog(path)  # asked for: an error if it is missing or bad
    recorded = runs[0]["info"].get("catalog")
    if recorded and Path(recorded).is_file():
        try:
            return load_catalog(recorded)
        except CultvlmError as e:
            click.echo(f"note: catalog not used for names: {e.message}", err=True)
    return {}


def _shared_items(runs: list[dict]) -> tuple[set, list[str]]:
    sets = [set(r["items"]) for r in runs]
    shared = set.intersection(*sets)
    sizes = ", ".join(f"{r['name']}: {len(s)} items (dataset {r['info'].get('dataset')})" for r, s in zip(runs, sets))
    if not shared:
        raise CultvlmError(f"the runs share no items, nothing to compare ({sizes})")
    notes = []
    if any(s != shared for s in sets):
        notes.append(f"The runs differ in items: compared on the {len(shared)} items all runs share, "
                     f"of {len(set.union(*sets))} in all ({sizes}).")
    return shared, notes


def _pairs(n: int) -> list[tuple[int, int]]:
    """Every run against the first, and consecutive runs when there are more than two."""
    pairs = [(0, i) for i in range(1, n)]
    return pairs + [(i - 1, i) for i in range(2, n)]


HEADLINE = [  # (label, where in compute_metrics' result)
    ("targets named", ("roles", "target", "naming")),
    ("controls named", ("roles", "control", "naming")),
    ("targets' work or author stated (fact)", ("roles", "target", "fact")),
    ("is-this-X answered right about targets (verification)", ("roles", "target", "verify")),
    ("a target named on an out-of-catalog picture (false positive)", ("restraint", "false_positives_on_negatives")),
    ("a target named on a control picture (false positive)", ("restraint", "false_positives_on_controls")),
]


def _at(metrics: dict, path: tuple) -> dict:
    for key in path:
        metrics = metrics[key]
    return metrics


def headline(runs: list[dict], vs_first: list[dict], roles: dict, also: list[dict]) -> list[tuple]:
    """The first screen: what was learned, what was forgotten, false positives."""
    names = [r["name"] for r in runs]
    blocks: list[tuple] = [("h2", "Headline")]
    blocks.append(("table", ["figure", *names],
                   [[label, *[fig_text(_at(r["metrics"], path)) for r in runs]] for label, path in HEADLINE]))
    lines = []
    for c in vs_first:
        verdicts = {e: entity_verdict(roles[e], t["naming"]) for e, t in c["tests_by_entity"].items()
                    if e in roles and t.get("naming", {}).get("n")}
        learned = [e for e, v in verdicts.items() if v == "learned"]
        missed = [e for e, v in verdicts.items() if roles[e] == "target" and v != "learned"]
        forgotten = [e for e, v in verdicts.items() if v == "forgotten"]
        lines.append(f"{c['run']} vs {c['reference']}: learned (naming rose significantly) "
                     f"{', '.join(learned) or 'none'}; targets not learned {', '.join(missed) or 'none'}; "
                     f"forgotten (control naming fell significantly) {', '.join(forgotten) or 'none'}; "
                     f"control retention {fig_text(c['retention'])}.")
    lines += [f"{r['name']} (other pictures, see below): targets named "
              f"{fig_text(r['metrics']['roles']['target']['naming'])}, controls named "
              f"{fig_text(r['metrics']['roles']['control']['naming'])}." for r in also]
    lines.append(UNITS)
    blocks.append(("ul", lines))
    return blocks


def build_report(runs: list[dict], folder: Path, catalog: dict, notes: list[str], also: list[dict] = ()) -> dict:
    for run in [*runs, *also]:
        run["metrics"] = compute_metrics(list(run["items"].values()))
    comparisons = [{"reference": runs[a]["name"], "run": runs[b]["name"],
                    **paired(list(runs[a]["items"].values()), list(runs[b]["items"].values()))}
                   for a, b in _pairs(len(runs))]
    roles = {e: v["role"] for e, v in runs[0]["metrics"]["entities"].items()}
    rank = {e: i for i, e in enumerate(catalog)}
    entities = sorted(roles, key=lambda e: (ROLES.index(roles[e]), rank.get(e, len(rank)), e))
    controls = [e for e in entities if roles[e] == "control"]
    names = [r["name"] for r in runs]

    vs_first = [c for c in comparisons if c["reference"] == names[0]]
    blocks: list[tuple] = [("h1", "cultvlm report: " + " vs ".join(names))]
    blocks += headline(runs, vs_first, roles, also)
    blocks.append(("h2", "Runs"))
    blocks.append(("p", f"Reference run: {names[0]}. {UNITS} Paired tests are exact sign tests on the pictures "
                        f"whose share of right answers changed (McNemar's test when a picture has one answer); "
                        f"significant means p < {ALPHA}."))
    blocks += [("p", n) for n in notes]
    blocks.append(("table", ["run", "model", "adapter", "dataset", "items compared", "finished"],
                   [[r["name"], r["info"].get("model"), r["info"].get("adapter") or "none",
                     r["info"].get("dataset"), len(r["items"]), r["info"].get("finished_at") or "no (unfinished run)"]
                    for r in runs]))
    if catalog:
        blocks.append(("table", ["entity", "role", "ru", "en"],
                       [[e, roles[e], catalog[e].name("ru"), catalog[e].name("en")] if e in catalog
                        else [e, roles[e], "", ""] for e in entities]))

    blocks.append(("h2", "Overall"))
    blocks.append(("table", ["figure", *names],
                   [[LABELS[key], *[fig_text(r["metrics"]["overall"][key]) for r in runs]] for key in LABELS]))
    blocks.append(("h2", "Restraint: false positives, hedges, hallucinated names"))
    blocks.append(("table", ["figure", *names],
                   [[label, *[fig_text(r["metrics"]["restraint"][key]) for r in runs]]
                    for key, label in RESTRAINT_LABELS.items()]))
    blocks.append(("h2", "Verification in POPE's three settings"))
    blocks.append(("p", "Each picture is asked whether it shows another entity: adversarial (a look-alike), "
                        "popular (the entity with the most training pictures), random. negatives: the share "
                        "answered no; accuracy: with every positive question (is this <the pictured entity>?) added."))
    blocks.append(("table", ["setting", *[f"{n}: {part}" for n in names for part in ("negatives", "accuracy")]],
                   [[setting, *[fig_text(r["metrics"]["pope"][setting][part]) for r in runs
                                for part in ("negatives", "accuracy")]] for setting in NEGATIVE_SETTINGS]))
    blocks.append(("p", "Macro averages: the mean of per-entity values; n counts entities."))
    blocks.append(("table", ["macro average", *names],
                   [[f"{role}s: {LABELS[key]}",
                     *[f"{pct(m['value']) if m['value'] is not None else 'n/a'} "
                       f"(n = {m['n']} {'entity' if m['n'] == 1 else 'entities'})"
                       for m in (r["metrics"]["macro"][role][key] for r in runs)]]
                    for role in ROLES for key in MACRO_KEYS]))

    blocks.append(("h2", "Naming accuracy per entity"))
    plot_naming(runs, entities, folder / "naming_accuracy.png")
    blocks.append(("img", "naming_accuracy.png", "Naming accuracy per entity (ru+en) with 95% Wilson intervals"))
    blocks.append(("table", ["entity", "role", *names],
                   [[e, roles[e], *[fig_text(r["metrics"]["entities"][e]["naming"]) for r in runs]]
                    for e in entities]))
    per_entity_keys = ("naming_ru", "naming_en", "fact", "verify_yes", "verify_no", "weighted")
    for run in runs:
        blocks.append(("h3", f"{run['name']}: all figures per entity"))
        blocks.append(("table", ["entity", *[LABELS[k] for k in per_entity_keys]],
                       [[e, *[fig_text(run["metrics"]["entities"][e][k]) for k in per_entity_keys]]
                        for e in entities]))

    blocks.append(("h2", "Confusion matrices"))
    named = {c for r in runs for row in r["metrics"]["confusion"].values() for c in row}
    columns = [*entities, *sorted(named - set(entities) - {NONE}), NONE]
    rows = [e for e in entities if any(e in r["metrics"]["confusion"] for r in runs)]
    if rows:
        plot_confusion(runs, rows, columns, folder / "confusion.png")
        blocks.append(("img", "confusion.png", "Naming answers: true entity (rows) x named entity (columns), counts"))
    else:
        blocks.append(("p", "No naming questions: no confusion matrix."))

    blocks.append(("h2", "Training and validation loss"))
    logs = {r["name"]: log for r in runs if (log := _train_log(r))}
    if logs:
        plot_loss(logs, folder / "loss.png")
        blocks.append(("img", "loss.png", "Training loss per step; validation loss where measured"))
        summary = []
        for name, log in logs.items():
            line = f"{name}: final train loss {log[-1]['loss']:.4f} at step {log[-1]['step']} ({len(log)} logged steps)"
            val = [r for r in log if r.get("val_loss") is not None]
            if val:
                line += f"; last validation loss {val[-1]['val_loss']:.4f} at step {val[-1]['step']}"
            summary.append(line)
        blocks.append(("ul", summary))
    else:
        blocks.append(("p", "No run has an adapter folder with train_log.jsonl."))

    if also:
        blocks += other_pictures(also, entities, roles, folder)

    if vs_first:
        blocks.append(("h2", f"Control retention vs {names[0]}"))
        blocks.append(("p", f"Of the control naming answers {names[0]} got right, the share each run still gets right "
                            "(per picture)."))
        plot_retention(vs_first, controls, folder / "retention.png")
        blocks.append(("img", "retention.png", "Control retention with 95% Wilson intervals"))
        blocks.append(("table", ["control", *[c["run"] for c in vs_first]],
                       [["all controls", *[fig_text(c["retention"]) for c in vs_first]]]
                       + [[e, *[fig_text(c["retention_by_entity"][e]) for c in vs_first]] for e in controls]))

        blocks.append(("h2", "Paired tests (exact sign test on pictures)"))
        blocks.append(("p", "gained: pictures with more right answers in the run than in the reference; lost: "
                            "the opposite; n: pictures both runs answered."))
        for c in comparisons:
            blocks.append(("h3", f"{c['run']} vs {c['reference']}"))
            blocks.append(("table", ["questions", "n", c["reference"], c["run"], "gained", "lost", "p", "verdict"],
                           [[LABELS[g], t["n"], fig_text(t["reference"]), fig_text(t["run"]), t["gained"],
                             t["lost"], p_text(t["p"]), change(t)] for g, t in c["tests"].items()]))

    blocks.append(("h2", "Analysis"))
    blocks += analysis(runs, vs_first, entities, roles)

    blocks.append(("h2", "Gallery"))
    blocks.append(("table", ["entity", "image", "question", *names], gallery(runs, entities, folder)))

    title = "cultvlm report: " + " vs ".join(names)
    (folder / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
    (folder / "report.html").write_text(to_html(blocks, folder, title), encoding="utf-8")
    report = {"reference": names[0], "notes": notes,
              "runs": {r["name"]: {"run": r["info"], "metrics": r["metrics"]} for r in runs},
              "also": {r["name"]: {"run": r["info"], "metrics": r["metrics"]} for r in also},
              "comparisons": comparisons}
    write_json(folder / "metrics.json", report)
    return report


def other_pictures(also: list[dict], entities: list[str], roles: dict, folder: Path) -> list[tuple]:
    """Runs on pictures the compared runs were not asked about (a held-out design of the same
    characters, say): naming per role and per entity, beside each other."""
    names = [r["name"] for r in also]
    known = [e for e in entities if any(e in r["metrics"]["entities"] for r in also)]
    blocks: list[tuple] = [("h2", "Naming on other pictures: " + ", ".join(names))]
    blocks.append(("p", "These runs asked the naming questions about other pictures than the runs above "
                        "(datasets: " + "; ".join(f"{r['name']}: {r['info'].get('dataset')}" for r in also)
                   + "), so they are shown beside each other, not tested against them."))
    blocks.append(("table", ["pictures", *names],
                   [[f"{role}s", *[fig_text(r["metrics"]["roles"][role]["naming"]) for r in also]]
                    for role in ROLES]
                   + [[f"{e} ({roles.get(e, '?')})",
                       *[fig_text(r["metrics"]["entities"][e]["naming"]) if e in r["metrics"]["entities"]
                         else "n/a" for r in also]] for e in known]))
    if known:
        first = also[0]["metrics"]["entities"]
        figure = _new_figure(max(6, 0.6 * len(known)), 4.5)
        ax = figure.add_subplot()
        _bars(ax, [f"{e} (n={first[e]['naming']['n'] if e in first else 0})" for e in known],
              {r["name"]: [r["metrics"]["entities"].get(e, {}).get("naming", {"n": 0, "value": None, "ci95": None})
                           for e in known] for r in also}, first_colour=2)
        ax.set_ylabel("naming accuracy (ru+en)")
        ax.set_title("Naming on other pictures, 95% Wilson intervals")
        figure.savefig(folder / "naming_other_pictures.png")
        blocks.append(("img", "naming_other_pictures.png", "Naming per entity on the other pictures"))
    return blocks


def analysis(runs: list[dict], vs_first: list[dict], entities: list[str], roles: dict) -> list[tuple]:
    """Sentences that restate the numbers above; a change is called one only when p < 0.05."""
    blocks: list[tuple] = []
    for c in vs_first:
        blocks.append(("h3", f"{c['run']} vs {c['reference']}"))
        blocks.append(("ul", [f"{LABELS[g]}: {change(t)}: {fig_text(t['reference'])} -> {fig_text(t['run'])}; "
                              f"{t['n']} paired pictures, gained {t['gained']}, lost {t['lost']}, p = {p_text(t['p'])}"
                              for g, t in c["tests"].items() if g in TESTED]))
        blocks.append(("p", "Per entity, naming accuracy (ru+en):"))
        lines = []
        for e in entities:
            t = c["tests_by_entity"].get(e, {}).get("naming")
            if not t or not t["n"]:
                lines.append(f"{e} ({roles[e]}): no naming items")
                continue
            lines.append(f"{e} ({roles[e]}): {entity_verdict(roles[e], t)}: {fig_text(t['reference'])} -> "
                         f"{fig_text(t['run'])}; {t['n']} paired pictures, gained {t['gained']}, "
                         f"lost {t['lost']}, p = {p_text(t['p'])}")
        blocks.append(("ul", lines))
        blocks.append(("p", f"Control retention: {fig_text(c['retention'])} of the control naming answers "
                            f"{c['reference']} got right are still right in {c['run']}."))
    if vs_first:
        blocks.append(("p", f"Each p-value is one test, not corrected for the {len(entities)} entities "
                            "tested: at p < 0.05 about one unchanged entity in twenty shows as significant by chance."))
    else:
        blocks.append(("p", "One run: nothing to test it against."))
    blocks.append(("h3", "Confusions"))
    for run in runs:
        cells = [(n, true, named) for true, row in run["metrics"]["confusion"].items()
                 for named, n in row.items() if named not in (true, NONE)]
        cells.sort(key=lambda x: (-x[0], x[1], x[2]))
        totals = {true: sum(row.values()) for true, row in run["metrics"]["confusion"].items()}
        lines = [f"{true} named as {named}: {n} of {totals[true]} naming answers"
                 for n, true, named in cells[:TOP_CONFUSIONS]]
        unnamed = sum(row.get(NONE, 0) for row in run["metrics"]["confusion"].values())
        lines.append(f"no catalog entity named: {unnamed} of {sum(totals.values())} naming answers")
        blocks.append(("p", f"{run['name']}: " + ("the most frequent confusions" if cells
                                                  else "no entity was named as another")))
        blocks.append(("ul", lines))
    return blocks


OWN_FILES = ("report.md", "report.html", "metrics.json", "*.png", "gallery")  # what a report holds


def compare(run_dirs: list[str], out: str, catalog_path: str | None = None, also_dirs: list[str] = ()) -> Path:
    runs = [load_run(Path(d)) for d in run_dirs]
    also = [load_run(Path(d)) for d in also_dirs]
    names = [r["name"] for r in [*runs, *also]]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CultvlmError(f"runs are labelled by folder name: {', '.join(repeated)} given twice")
    shared, notes = _shared_items(runs)
    for note in notes:
        click.echo(note)
    for run in runs:
        whole = len(run["items"]) == len(shared)
        run["items"] = {i: r for i, r in run["items"].items() if i in shared}
        stored = run["stored_metrics"]
        if whole and stored:
            fresh = compute_metrics(list(run["items"].values()))
            if any(stored.get(k) != fresh[k] for k in ("overall", "entities", "confusion")):
                notes.append(f"{run['name']}/metrics.json disagrees with its predictions.jsonl; "
                             "the report uses numbers recomputed from the predictions.")
                click.echo(f"note: {notes[-1]}", err=True)
    catalog = _catalog(catalog_path, runs)
    target = Path(out)
    for run_dir in [*run_dirs, *also_dirs]:
        check_out_apart(target, "compare", run=run_dir)
    check_replaceable(target, "compare", OWN_FILES)
    folder = partial_folder(target)
    try:
        build_report(runs, folder, catalog, notes, also)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # leave no half-built report behind
        raise
    replace_folder(folder, target, "compare", OWN_FILES)
    return target


@click.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="report folder, e.g. reports/base-vs-tuned")
@click.option("--catalog", "catalog_path", type=click.Path(dir_okay=False),
              help="entity catalog for names (default: the one the first run used)")
@click.option("--also", "also", multiple=True, type=click.Path(file_okay=False),
              help="a run on other pictures (a held-out design, say): its naming is shown on its own, "
                   "not tested against RUNS (repeatable)")
def command(runs, out, catalog_path, also):
    """Compare evaluation RUNS (the first is the reference): report.md, report.html, figures."""
    folder = compare(list(runs), out, catalog_path, list(also))
    click.echo(f"report written to {folder / 'report.md'} and {folder / 'report.html'}")
