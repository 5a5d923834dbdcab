"""The report of a series (`cultvlm experiment`): per variant over seeds, against its baseline and
against the variant it is compared with, as tables (report.md, report.html) and figures."""

from __future__ import annotations

import shutil
from pathlib import Path

from .files import partial_folder, replace_folder, write_json
from .metrics import difference, paired_tests, summarize
from .report import change, compare, count_text, fig_text, load_run, p_text, to_html, to_markdown
from .series import CANDIDATES, Group, Run, Series, mix_folder

# Figures of the report: key -> (role or None for all entities, metrics group, label).
METRICS = {
    "target_naming": ("target", "naming", "Target naming accuracy (ru+en)"),
    "retention": (None, None, "Control retention vs the baseline"),
    "control_naming": ("control", "naming", "Control naming accuracy (ru+en)"),
    "target_fact": ("target", "fact", "Target fact accuracy"),
    "verify": (None, "verify", "Verification accuracy (yes/no), all entities"),
    "all": (None, "all", "All questions"),
}


def role_figure(metrics: dict, role: str | None, group: str) -> dict:
    """A run's accuracy over the pictures of one role, from its metrics.json; over all catalog
    entities, the overall figure."""
    return metrics["roles"][role][group] if role else metrics["overall"][group]


INTERVALS = (
    "How the intervals are computed. Per run, an accuracy is counted per picture over the pictures of "
    "the role (k/n: n pictures, k the sum of each picture's share of right answers -- a picture asked "
    "in Russian and English is one picture -- from the run's metrics.json). Seed columns: the mean of "
    "the per-seed accuracies and a 95% Student-t interval over seeds, mean ± t(0.975, m−1)·s/√m (m "
    "seeds, s their sample standard deviation; shown when m ≥ 2, clipped to [0, 100]%). It measures "
    "how much the result moves with the training seed on these fixed test pictures, not the sampling "
    "error of the test set. Pooled column: the runs of all seeds together, Σk/Σn, with a 95% Wilson "
    "interval; it counts every (picture, seed) as independent, but the seeds answer the same "
    "pictures, so it is narrower than an interval over fresh test pictures would be (for that, read "
    "one run's Wilson interval in details/). Baselines are one greedy run each: no seed interval. "
    "Control retention: of the control naming answers the variant's baseline got right, the share "
    "the run still gets right.")


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _interval(ci) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _summary_cells(s: dict) -> list[str]:
    seeds = (_interval(s["t_ci95"]) + f" (±{100 * s['t_half_width']:.1f} pp, {len(s['values'])} seeds)"
             if s["t_ci95"] else f"n/a ({len(s['values'])} value{'s' if len(s['values']) != 1 else ''})")
    return [_pct(s["mean"]), seeds, fig_text(s["pooled"])]


def _settings_row(group: Group, train_lines: dict[str, int]) -> list:
    if group.kind == "baseline":
        prompt = {"candidates": "candidate names", "reference_images": "a reference picture per entity"}.get(
            group.prompt, "plain")
        return [group.name, "baseline (no training)", group.model, "1 run", "", "", "", "", "", "", "",
                f"{prompt}; eval {group.eval['max_pixels']} px", group.baseline or "", group.note]
    t = group.train
    targets = ",".join(x.removesuffix("_proj") for x in t["targets"]) + (f" + vision {t['vision']}"
                                                                          if t["vision"] != "none" else "")
    mix = "all" if group.mix is None else "+".join(group.mix)
    return [group.name, "variant", group.model, f"{len(group.runs)} seeds", t["rank"], f"{t['alpha']:g}", targets,
            f"{mix} ({train_lines[group.name]} lines)", t["steps"], f"{t['learning_rate']:g}", t["max_pixels"],
            f"plain; eval {group.eval['max_pixels']} px", group.baseline or "", group.note]


def _plot(summaries: dict[str, dict], per_run: dict[str, list[dict]], kinds: dict[str, str], path: Path,
          title: str, ylabel: str) -> None:
    """Bars: the mean over seeds; black bars: 95% t-interval over seeds; grey: pooled Wilson
    interval; dots: each seed's value."""
    from matplotlib.figure import Figure  # deferred: matplotlib is a second of import, for the plots only

    names = list(summaries)
    fig = Figure(figsize=(max(7, 0.9 * len(names) + 2), 4.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for x, name in enumerate(names):
        s = summaries[name]
        if s["mean"] is None:
            ax.text(x, 0.03, "n/a", ha="center", fontsize=8)
            continue
        ax.bar(x, s["mean"], 0.6, color="C0" if kinds[name] == "variant" else "C7", alpha=0.8)
        low, high = s["pooled"]["ci95"]
        ax.errorbar(x + 0.12, s["pooled"]["value"], yerr=[[s["pooled"]["value"] - low], [high - s["pooled"]["value"]]],
                    fmt="none", ecolor="0.5", capsize=3, lw=1)
        if s["t_ci95"]:
            lo, hi = s["t_ci95"]
            ax.errorbar(x - 0.12, s["mean"], yerr=[[s["mean"] - lo], [hi - s["mean"]]], fmt="none",
                        ecolor="black", capsize=4, lw=2)
        values = [f["value"] for f in per_run[name] if f["n"]]
        ax.plot([x - 0.12] * len(values), values, "o", color="C3", ms=4, zorder=3)
    labels = [f"{n}\n{s['runs']} run{'s' if s['runs'] > 1 else ''}, {s['pooled']['n']} answers"
              for n, s in summaries.items()]
    ax.set_xticks(range(len(names)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\nbars: mean over seeds; black: 95% t-interval over seeds;\n"
                 "grey: pooled 95% Wilson interval; dots: each seed", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)


def write_report(series: Series, runs: list[Run], target: Path) -> Path:
    loaded = {r.name: load_run(r.folder) for r in runs}
    groups = series.groups

    # Per run: every figure of the tables; retention and paired tests against the baseline.
    per_run: dict[str, dict[str, dict]] = {}
    vs_baseline: list[dict] = []
    for r in [r for g in groups for r in g.runs]:  # by variant, then seed
        metrics = loaded[r.name]["stored_metrics"]  # the run's metrics.json
        figures = {key: role_figure(metrics, role, grp) for key, (role, grp, _) in METRICS.items() if grp}
        base = r.group.baseline
        if base:
            test = paired_tests(loaded[series.group(base).runs[0].name], loaded[r.name])
            test["seed"] = r.seed
            vs_baseline.append(test)
            figures["retention"] = test["retention"]
        else:
            figures["retention"] = {"k": 0, "n": 0, "value": None, "ci95": [0.0, 1.0]}
        per_run[r.name] = figures
    summaries = {key: {g.name: summarize([per_run[r.name][key] for r in g.runs]) for g in groups}
                 for key in METRICS}
    vs_variant = []
    for g in groups:
        if g.kind == "variant" and g.compare_with:
            other = series.group(g.compare_with)
            for mine, theirs in zip(g.runs, other.runs):
                test = paired_tests(loaded[theirs.name], loaded[mine.name])
                test["seed"] = mine.seed
                vs_variant.append(test)
    differences = {
        g.name: {key: difference([per_run[r.name][key] for r in g.runs],
                                 [per_run[r.name][key] for r in series.group(g.compare_with).runs])
                 for key in ("target_naming", "control_naming", "retention")}
        for g in groups if g.kind == "variant" and g.compare_with}

    folder = partial_folder(target)
    try:
        train_lines = {}
        for g in groups:
            if g.kind == "variant":
                data = mix_folder(target.parent, g.mix) / "train.jsonl" if g.mix else series.data / "train.jsonl"
                train_lines[g.name] = sum(1 for line in data.read_bytes().splitlines() if line.strip())
        items = {len(loaded[r.name]["items"]) for r in runs}
        blocks: list[tuple] = [("h1", f"cultvlm experiment: {series.name}")]
        if series.description:
            blocks.append(("p", series.description))
        blocks.append(("p", f"Series file {series.file}; dataset {series.data}, split {series.eval['split']} "
                            f"({', '.join(map(str, sorted(items)))} items per run); catalog {series.catalog}; "
                            f"seeds {', '.join(map(str, series.seeds))}; {len(runs)} runs."))
        blocks.append(("h2", "Variants"))
        blocks.append(("table", ["name", "kind", "model", "runs", "rank", "alpha", "LoRA targets", "train mix",
                                 "steps", "learning rate", "train max pixels", "eval prompt", "baseline", "note"],
                       [_settings_row(g, train_lines) for g in groups]))
        own = [f"{g.name}: " + ", ".join(f"{k}={v}" for k, v in g.own.items()) for g in groups if g.own]
        if own:
            blocks.append(("p", "Set on each entry of the series file (the rest from defaults):"))
            blocks.append(("ul", own))

        blocks.append(("h2", "Results"))
        blocks.append(("p", INTERVALS))
        figures = {"target_naming": ("naming_targets.png", "naming accuracy (targets)"),
                   "retention": ("retention.png", "control retention")}
        for key, (_, _, label) in METRICS.items():
            blocks.append(("h3", label))
            if key in figures:
                name, ylabel = figures[key]
                _plot(summaries[key], {g.name: [per_run[r.name][key] for r in g.runs] for g in groups},
                      {g.name: g.kind for g in groups}, folder / name, label, ylabel)
                blocks.append(("img", name, f"{label}: mean over seeds with its 95% t-interval (black), "
                                            "pooled 95% Wilson interval (grey), each seed (dots)"))
            rows = []
            for g in groups:
                s = summaries[key][g.name]
                per_seed = "; ".join(
                    (f"s{r.seed}: " if r.seed is not None else "") + count_text(per_run[r.name][key])
                    for r in g.runs)
                rows.append([g.name, per_seed, *_summary_cells(s)])
            blocks.append(("table", ["variant", "per run (k/n)", "mean", "95% t-interval over seeds",
                                     "pooled k/n = value [95% Wilson]"], rows))

        candidates = [g for g in groups if g.prompt == "candidates"]
        if candidates:
            lines = []
            for g in candidates:
                several = loaded[g.runs[0].name]["stored_metrics"]["restraint"]["several_named"]
                lines.append(f"{g.name}: {fig_text(several)} of the naming answers name several entities "
                             "(an answer that repeats the list names none, and is graded wrong)")
            blocks.append(("p", "Prompting baselines with the candidate names in the question "
                                f"({'; '.join(CANDIDATES)} questions, names in catalog order):"))
            blocks.append(("ul", lines))

        blocks.append(("h2", "Paired tests (exact sign test on pictures)"))
        blocks.append(("p", "Every run against its baseline, and each variant against the variant it is compared "
                            "with on the same seed, on the items both answered. gained: pictures with more right "
                            "answers in the run than in the reference; lost: the opposite; significant means "
                            "p < 0.05, one test per row, "
                            f"not corrected for the {len(vs_baseline) + len(vs_variant)} rows."))

        def paired_rows(tests: list[dict]) -> list[list]:
            rows = []
            for t in tests:
                row = [t["run"], t["reference"], t["shared"]]
                for key in ("target_naming", "control_naming"):
                    x = t[key]
                    row += [f"{count_text(x['reference'])} -> {count_text(x['run'])}", x["gained"], x["lost"],
                            p_text(x["p"]), change(x)]
                row.append(fig_text(t["retention"]))
                rows.append(row)
            return rows

        header = ["run", "reference", "shared items", "target naming", "gained", "lost", "p", "verdict",
                  "control naming", "gained", "lost", "p", "verdict", "control retention"]
        if vs_baseline:
            blocks.append(("h3", "Against the baseline"))
            blocks.append(("table", header, paired_rows(vs_baseline)))
            blocks.append(("ul", _verdicts(groups, vs_baseline, "baseline")))
        if vs_variant:
            blocks.append(("h3", "Variant against variant, seed-matched"))
            blocks.append(("table", header, paired_rows(vs_variant)))
            blocks.append(("ul", _verdicts(groups, vs_variant, "compare_with")))
            blocks.append(("p", "Seed-matched differences (run minus reference, per seed), mean and 95% "
                                "t-interval over seeds:"))
            rows = []
            for g in groups:
                if g.name not in differences:
                    continue
                for key in ("target_naming", "control_naming", "retention"):
                    d = differences[g.name][key]
                    rows.append([f"{g.name} - {g.compare_with}", METRICS[key][2],
                                 "; ".join(f"{100 * x:+.1f} pp" for x in d["differences"]) or "n/a",
                                 "n/a" if d["mean"] is None else f"{100 * d['mean']:+.1f} pp",
                                 f"[{100 * d['t_ci95'][0]:+.1f}, {100 * d['t_ci95'][1]:+.1f}] pp"
                                 if d["t_ci95"] else "n/a (fewer than 2 seeds)"])
            blocks.append(("table", ["pair", "figure", "per seed", "mean", "95% t-interval"], rows))

        detail_runs = [g.runs[0] for g in groups]
        compare([str(r.folder) for r in detail_runs], str(folder / "details"), str(series.catalog))
        blocks.append(("h2", "Details"))
        blocks.append(("p", "details/report.md and details/report.html: `cultvlm compare` of "
                            + ", ".join(r.name for r in detail_runs)
                            + " (each variant's first seed): per-entity tables, confusion matrices, training "
                              "loss, retention per control, gallery."))

        (folder / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
        (folder / "report.html").write_text(to_html(blocks, folder, f"cultvlm experiment: {series.name}"),
                                            encoding="utf-8")
        write_json(folder / "metrics.json", {
            "series": series.name, "file": str(series.file), "intervals": INTERVALS,
            "groups": {g.name: {"kind": g.kind, "model": g.model, "seeds": [r.seed for r in g.runs],
                                "runs": {r.name: {"folder": str(r.folder), "settings": r.settings,
                                                  "figures": per_run[r.name]} for r in g.runs},
                                "summary": {key: summaries[key][g.name] for key in METRICS}}
                       for g in groups},
            "vs_baseline": vs_baseline, "vs_variant": vs_variant, "differences": differences})
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    replace_folder(folder, target)
    return target


def _verdicts(groups: list[Group], tests: list[dict], attribute: str) -> list[str]:
    lines = []
    for g in groups:
        mine = [t for t in tests if t["run"] in {r.name for r in g.runs}]
        if not mine:
            continue
        reference = getattr(g, attribute)
        parts = []
        for key, label in (("target_naming", "target naming"), ("control_naming", "control naming")):
            verdicts = [change(t[key]) for t in mine]
            parts.append(f"{label} rose significantly in {verdicts.count('rose significantly')}, fell significantly "
                         f"in {verdicts.count('fell significantly')} of {len(mine)} run{'s' if len(mine) > 1 else ''}")
        lines.append(f"{g.name} vs {reference}: " + "; ".join(parts))
    return lines

