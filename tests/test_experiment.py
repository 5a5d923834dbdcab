"""`cultvlm experiment`: a tiny series (2 variants x 2 seeds + 2 baselines) on the tiny model ->
one report whose numbers are the runs' own; re-runs skip finished runs; changed runs are
refused (or redone with --force); bad series files are one-line errors naming file and field."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image
from scipy.stats import t as student_t

import mlx_cultvlm.experiment as experiment_module
from conftest import PIXELS, TARGETS
from mlx_cultvlm.errors import CultvlmError
from mlx_cultvlm.experiment import command, plan, run_series
from mlx_cultvlm.series import load_series
from mlx_cultvlm.series_report import METRICS
from mlx_cultvlm.files import write_json
from mlx_cultvlm.metrics import KINDS, compute_metrics, mcnemar_exact, paired, wilson
from mlx_cultvlm.report import count_text, load_run
from test_metrics import pred

CATALOG = str(Path(__file__).resolve().parent.parent / "data" / "entities.json")
FIGURE = re.compile(r"(\d+(?:\.\d)?)/(\d+) = (\d+\.\d)% \[(\d+\.\d), (\d+\.\d)\]")
NOT_NAMING = [  # hard negatives added to the synthetic train split, so that the mix filter has work
    {"images": ["images/train/0_0.png"],
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Это Колобок?"}]},
                  {"role": "assistant", "content": "Нет, это не Колобок, а Чебурашка."}],
     "meta": {"entity": "cheburashka", "kind": "verify_no"}},
    {"images": ["images/train/1_0.png"],
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Это Пикачу?"}]},
                  {"role": "assistant", "content": "Нет, это не Пикачу, а Колобок."}],
     "meta": {"entity": "kolobok", "kind": "verify_no"}},
]


def series_dict(data: Path) -> dict:
    return {
        "name": "tiny-series",
        "data": str(data),
        "catalog": CATALOG,
        "eval": {"split": "test", "max_pixels": PIXELS, "max_tokens": 6, "batch_size": 16},
        "defaults": {"rank": 8, "alpha": 16, "dropout": 0.0, "steps": 6, "learning_rate": "1e-3",
                     "warmup_steps": 2, "batch_size": 4, "targets": TARGETS, "max_pixels": PIXELS,
                     "val_every": 40, "save_every": 40},
        "seeds": [0, 1],
        "baselines": [{"name": "base"}, {"name": "base-names", "prompt": "candidates"}],
        "variants": [{"name": "naming-only", "mix": ["naming"], "note": "names alone"},
                     {"name": "everything", "rank": 4, "alpha": 8}],
    }


def write_series(path: Path, series: dict, model: Path) -> Path:
    series = json.loads(json.dumps(series))
    series["defaults"]["model"] = str(model)
    for b in series["baselines"]:
        b.setdefault("model", str(model))
    path.write_text(yaml.safe_dump(series, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


class Counter:
    """Counts the trainings and evaluations a series starts (the real ones run)."""

    def __init__(self, monkeypatch):
        self.trained, self.evaluated = [], []
        real_train, real_evaluate = experiment_module.train, experiment_module.evaluate

        def train(cfg, **kw):
            self.trained.append(cfg.out)
            return real_train(cfg, **kw)

        def evaluate(model, out, **kw):
            self.evaluated.append(str(out))
            return real_evaluate(model, out, **kw)

        monkeypatch.setattr(experiment_module, "train", train)
        monkeypatch.setattr(experiment_module, "evaluate", evaluate)


@pytest.fixture(scope="module")
def series(tiny_4bit, dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    data = root / "dataset"
    shutil.copytree(dataset[0], data)
    with (data / "train.jsonl").open("a", encoding="utf-8") as f:
        for line in NOT_NAMING:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    yaml_path = write_series(root / "tiny-series.yaml", series_dict(data), tiny_4bit)
    out = root / "runs" / "tiny-series"
    with pytest.MonkeyPatch.context() as mp:
        counter = Counter(mp)
        report = run_series(yaml_path, out, progress=False)
    return {"root": root, "data": data, "yaml": yaml_path, "out": out, "report": report, "counter": counter,
            "model": tiny_4bit}


def table(md: str, title: str) -> dict[str, list[str]]:
    """The body rows of the first table after `title`, by first cell (the first row of each)."""
    lines = md[md.index(title):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|---"))
    rows = {}
    for line in lines[start + 1:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows.setdefault(cells[0], cells)
    return rows


def run_metrics(out: Path, name: str) -> dict:
    return json.loads((out / name / "metrics.json").read_text(encoding="utf-8"))


def pooled_over(metrics: dict, role: str | None, group: str) -> tuple[float, int]:
    """k/n over the pictures of a role (per picture, as metrics counts)."""
    fig = metrics["roles"][role][group] if role else metrics["overall"][group]
    return fig["k"], fig["n"]


def check_tables(md: str, stored: dict, out: Path, groups: dict[str, list], base: str = "base") -> None:
    """Every results table: per run k/n equal to the run's metrics.json (retention: to
    metrics.paired against the base run); the mean and t-interval over seeds; the pooled k/n
    with its Wilson interval; and the same numbers in the report's metrics.json."""
    base_items = load_run(out / base)["items"]
    for key, (role, group, label) in METRICS.items():
        rows = table(md, f"### {label}")
        assert set(rows) == set(groups)
        for variant, seeds in groups.items():
            figures = []
            for seed in seeds:
                name = variant if seed is None else f"{variant}-s{seed}"
                if key == "retention":
                    if name == base:
                        k, n = 0, 0
                    else:
                        r = paired(list(base_items.values()), list(load_run(out / name)["items"].values()))["retention"]
                        k, n = r["k"], r["n"]
                else:
                    k, n = pooled_over(run_metrics(out, name), role, group)
                figures.append((k, n))
            row = rows[variant]
            assert row[1] == "; ".join((f"s{s}: " if s is not None else "") + count_text({"k": k, "n": n})
                                       for s, (k, n) in zip(seeds, figures))
            values = [k / n for k, n in figures if n]
            summary = stored["groups"][variant]["summary"][key]
            assert summary["values"] == values and summary["runs"] == len(seeds)
            mean = sum(values) / len(values) if values else None
            assert row[2] == ("n/a" if mean is None else f"{100 * mean:.1f}%")
            if len(values) >= 2:
                sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                half = student_t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values))
                low, high = max(0.0, mean - half), min(1.0, mean + half)
                assert row[3] == f"[{100 * low:.1f}, {100 * high:.1f}] (±{100 * half:.1f} pp, {len(values)} seeds)"
                assert summary["t_ci95"] == pytest.approx([low, high])
            else:
                assert row[3].startswith("n/a") and summary["t_ci95"] is None
            k, n = sum(k for k, _ in figures), sum(n for _, n in figures)
            assert (summary["pooled"]["k"], summary["pooled"]["n"]) == (pytest.approx(k), n)
            if n:
                got = FIGURE.fullmatch(row[4]).groups()
                assert (float(got[0]), int(got[1])) == (round(k, 1), n)
                assert [float(got[3]), float(got[4])] == [round(100 * x, 1) for x in wilson(k, n)]
            else:
                assert row[4] == "n/a (n = 0)"


def test_series_trains_evaluates_and_reports(series):
    out, report, counter = series["out"], series["report"], series["counter"]
    runs = ["base", "base-names", "naming-only-s0", "naming-only-s1", "everything-s0", "everything-s1"]
    assert sorted(Path(p).parent.name for p in counter.trained) == sorted(runs[2:])
    assert sorted(Path(p).name for p in counter.evaluated) == sorted(runs)
    for name in runs:
        assert (out / name / "metrics.json").is_file()

    # The mix: naming-only trains on the naming lines only, the others on everything; valid and
    # test are the dataset's own, so every run answers the same items.
    derived = out / "data" / "naming"
    kinds = [json.loads(line)["meta"]["kind"] for line in (derived / "train.jsonl").read_text().splitlines()]
    assert kinds == ["naming"] * 32
    assert (derived / "valid.jsonl").read_bytes() == (series["data"] / "valid.jsonl").read_bytes()
    used = yaml.safe_load((out / "naming-only-s0" / "adapters" / "config.yaml").read_text())
    assert Path(used["data"]) == derived and used["seed"] == 0 and used["rank"] == 8
    used = yaml.safe_load((out / "everything-s1" / "adapters" / "config.yaml").read_text())
    assert Path(used["data"]) == series["data"] and used["seed"] == 1 and used["rank"] == 4
    assert used["learning_rate"] == 1e-3  # "1e-3" read as a number
    items = {name: set(load_run(out / name)["items"]) for name in runs}
    assert all(ids == items["base"] for ids in items.values())
    assert len({item_id.split(":")[0] for item_id in items["base"]}) == 16  # pictures

    # The candidates baseline asked the same items with the names appended to naming/fact questions.
    names = load_run(out / "base-names")["items"]
    plain = load_run(out / "base")["items"]
    for item_id, record in names.items():
        if record["kind"] in ("naming_ru", "naming_en", "fact"):
            assert record["prompt"].startswith(plain[item_id]["prompt"] + " ")
            assert ("Чебурашка; Старуха Шапокляк; Колобок; Пикачу" in record["prompt"]
                    or "Cheburashka; Old Lady Shapoklyak; Kolobok; Pikachu" in record["prompt"])
        else:
            assert record["prompt"] == plain[item_id]["prompt"]

    md = (report / "report.md").read_text(encoding="utf-8")
    page = (report / "report.html").read_text(encoding="utf-8")
    stored = json.loads((report / "metrics.json").read_text(encoding="utf-8"))

    # Figures exist, are pictures, are referenced, and the HTML embeds them.
    referenced = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert referenced == ["naming_targets.png", "retention.png"]
    for name in referenced:
        with Image.open(report / name) as img:
            img.verify()
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == 2
    assert (report / "details" / "report.md").is_file() and "details/report.md" in md

    check_tables(md, stored, out, {"base": [None], "base-names": [None], "naming-only": [0, 1],
                                   "everything": [0, 1]})

    # Paired tests: every run against the base, and seed-matched everything vs naming-only.
    pairs = {(t["run"], t["reference"]) for t in stored["vs_baseline"]}
    assert pairs == {(r, "base") for r in runs[1:]}
    assert {(t["run"], t["reference"]) for t in stored["vs_variant"]} == {
        ("everything-s0", "naming-only-s0"), ("everything-s1", "naming-only-s1")}
    rows = table(md, "### Variant against variant, seed-matched")
    test = next(t for t in stored["vs_variant"] if t["run"] == "everything-s1")
    expected = paired([r for r in load_run(out / "naming-only-s1")["items"].values() if r["role"] == "target"],
                      [r for r in load_run(out / "everything-s1")["items"].values() if r["role"] == "target"])
    assert test["target_naming"] == expected["tests"]["naming"]
    row = rows["everything-s1"]
    assert row[1] == "naming-only-s1" and row[2] == str(len(items["base"]))  # shared items
    assert test["target_naming"]["n"] == 12  # target pictures
    assert int(row[4]) == test["target_naming"]["gained"]
    assert "everything - naming-only" in md and "not corrected" in md
    assert "Student-t" in md and "Wilson" in md


def test_rerun_skips_finished_runs(series):
    out = series["out"]
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/predictions.jsonl")}
    stamps |= {p: p.stat().st_mtime_ns for p in out.glob("*/adapters/adapters.safetensors")}
    assert len(stamps) == 6 + 4
    with pytest.MonkeyPatch.context() as mp:
        counter = Counter(mp)
        run_series(series["yaml"], out, progress=False)
    assert counter.trained == [] and counter.evaluated == []
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (out / "report" / "report.md").is_file()

    # Unfinished runs (no metrics.json, as if killed at the end) resume: no training (the
    # adapters are whole), no answer generated again (every prediction is there).
    before = {name: (out / name / "metrics.json").read_text() for name in ("base", "naming-only-s1")}
    for name in before:
        (out / name / "metrics.json").unlink()
    with pytest.MonkeyPatch.context() as mp:
        counter = Counter(mp)
        run_series(series["yaml"], out, progress=False)
    assert counter.trained == [] and sorted(Path(p).name for p in counter.evaluated) == ["base", "naming-only-s1"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert {name: (out / name / "metrics.json").read_text() for name in before} == before


def test_changed_variant_is_refused_then_redone_with_force(series):
    changed = series_dict(series["data"])
    changed["variants"][1]["rank"] = 2
    changed["baselines"][1]["eval"] = {"max_tokens": 5}
    path = write_series(series["root"] / "changed.yaml", changed, series["model"])
    result = CliRunner().invoke(command, [str(path), "--out", str(series["out"])])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith(f"Error: {series['out'] / 'base-names'}: was run with other settings "
                                    "(eval.max_tokens: 6 -> 5)")
    assert "(and 2 more runs changed)" in result.output and "--force" in result.output
    result = CliRunner().invoke(command, [str(path), "--out", str(series["out"]), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "everything-s0: changed (train.rank: 4 -> 2)" in result.output
    assert "naming-only-s0: finished" in result.output

    # --force redoes exactly the changed runs (the baseline only, once the variant is put back).
    changed["variants"][1]["rank"] = 4
    write_series(path, changed, series["model"])
    with pytest.MonkeyPatch.context() as mp:
        counter = Counter(mp)
        run_series(path, series["out"], force=True, progress=False)
    assert counter.trained == [] and [Path(p).name for p in counter.evaluated] == ["base-names"]
    assert json.loads((series["out"] / "base-names" / "run.json").read_text())["max_tokens"] == 5


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(seed=[0]), r": unknown field 'seed' \(known: baselines, catalog, data, "),
    (lambda s: s["variants"][1].update(rnak=8), r": variants\[1\] \(everything\): unknown field 'rnak' "),
    (lambda s: s.update(data="/nonexistent/culture"), r": data: folder /nonexistent/culture not found "),
    (lambda s: s["variants"][0].update(mix=["naming", "facts"]),
     r": variants\[0\] \(naming-only\): mix: unknown kind 'facts' \(kinds: naming, fact, "),
    (lambda s: s["variants"][0].update(mix=["fact"]),
     r": variants\[0\] \(naming-only\): mix: fact selects none of the lines of .*train.jsonl "
     r"\(kinds there: naming 32, verify_no 2\)"),
    (lambda s: s["defaults"].update(learning_rate="fast"), r": defaults: learning_rate must be a number, got 'fast'"),
    (lambda s: s["defaults"].update(learning_rate=float("nan")), r": defaults: learning_rate must be a finite number"),
    (lambda s: s.update(eval={"max_tokens": 0}), r": eval.max_tokens must be greater than 0, got 0"),
    (lambda s: s.update(eval={"split": "tset"}), r": eval.split must be 'train', 'valid' or 'test', got 'tset'"),
    (lambda s: s["variants"][0].update(eval={"batch_size": 2.5}),
     r": variants\[0\] \(naming-only\): eval.batch_size must be a whole number, got 2.5"),
    (lambda s: s["variants"][1].update(compare_with="nope"),
     r": variants\[1\] \(everything\): compare_with: 'nope' is not another variant"),
    (lambda s: s["baselines"][1].update(prompt="pictures"),
     r": baselines\[1\] \(base-names\): prompt: expected one of plain, candidates, reference_images, got 'pictures'"),
    (lambda s: s["variants"][0].update(rank=0), r": variants\[0\] \(naming-only\): rank must be greater than 0, got 0"),
])
def test_bad_series_file_is_a_one_line_error(series, tmp_path, edit, message):
    bad = series_dict(series["data"])
    edit(bad)
    path = write_series(tmp_path / "bad.yaml", bad, series["model"])
    with pytest.raises(CultvlmError, match=re.escape(str(path)) + message):
        run_series(path, tmp_path / "out", progress=False)
    result = CliRunner().invoke(command, [str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.output.startswith(f"Error: {path}: ") and result.output.count("\n") == 1
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_unreadable_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nvariants: [\n", encoding="utf-8")
    result = CliRunner().invoke(command, [str(path)])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith(f"Error: {path}: not valid YAML (")


# ---- a series of planted, finished runs: numbers that differ from seed to seed

PLANTED = {"cheburashka": "target", "kolobok": "target", "pikachu": "control"}


def base_rule(entity, kind, i):
    if PLANTED[entity] == "control":
        return i < 10  # the base knows the control on 10 of 12 pictures
    return kind.startswith("verify") and i % 2 == 0  # and the targets not at all


def tuned_rule(learned: dict, forgotten: int):
    def rule(entity, kind, i):
        if PLANTED[entity] == "control":
            return i < 10 - forgotten
        if kind.startswith("naming") or kind == "fact":
            return i < learned[entity]
        return base_rule(entity, kind, i)
    return rule


RULES = {
    "base": base_rule,
    "small-s0": tuned_rule({"cheburashka": 3, "kolobok": 2}, 0),
    "small-s1": tuned_rule({"cheburashka": 5, "kolobok": 2}, 1),
    "small-s2": tuned_rule({"cheburashka": 4, "kolobok": 6}, 3),
    "large-s0": tuned_rule({"cheburashka": 8, "kolobok": 6}, 1),
    "large-s1": tuned_rule({"cheburashka": 9, "kolobok": 8}, 1),
    "large-s2": tuned_rule({"cheburashka": 7, "kolobok": 8}, 0),
}


def plant(folder: Path, settings: dict, rule, data: Path) -> None:
    """A finished run as `cultvlm experiment` leaves it (no model involved)."""
    rows = [pred(entity, role, kind, rule(entity, kind, i), i)
            for entity, role in PLANTED.items() for i in range(12) for kind in KINDS]
    folder.mkdir(parents=True)
    write_json(folder / "run.json", {"model": "tiny-4bit", "adapter": None, "dataset": str(data), "split": "test",
                                     "catalog": CATALOG, "items": len(rows), "started_at": "2025-01-01T00:00:00",
                                     "finished_at": "2025-01-01T01:00:00"})
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    write_json(folder / "metrics.json", compute_metrics(rows))
    write_json(folder / "experiment.json", {"settings": settings, "finished_at": "2025-01-01T01:00:00"})


def test_report_of_planted_runs(dataset, tmp_path, monkeypatch):
    series = {"name": "planted", "data": str(dataset[0]), "catalog": CATALOG, "seeds": [0, 1, 2],
              "defaults": {"model": "tiny-4bit", "steps": 100},
              "baselines": [{"name": "base", "model": "tiny-4bit"}],
              "variants": [{"name": "small", "rank": 4}, {"name": "large", "rank": 64, "alpha": 128}]}
    path = tmp_path / "planted.yaml"
    path.write_text(yaml.safe_dump(series), encoding="utf-8")
    out = tmp_path / "runs" / "planted"
    runs, _ = plan(load_series(path), out)
    assert [r.name for r in runs] == ["base", "small-s0", "large-s0", "small-s1", "large-s1", "small-s2", "large-s2"]
    for run in runs:
        plant(run.folder, run.settings, RULES[run.name], dataset[0])

    counter = Counter(monkeypatch)
    report = run_series(path, out, progress=False)
    assert counter.trained == [] and counter.evaluated == []  # every run was finished
    md = (report / "report.md").read_text(encoding="utf-8")
    stored = json.loads((report / "metrics.json").read_text(encoding="utf-8"))
    check_tables(md, stored, out, {"base": [None], "small": [0, 1, 2], "large": [0, 1, 2]})

    # Checked by hand, in pictures: 24 target pictures, a learned one named in both languages;
    # controls: the base named 10 of 12 pictures right, and the tuned runs forget some of them.
    naming = table(md, "### Target naming accuracy (ru+en)")
    assert naming["small"][1] == "s0: 5/24; s1: 7/24; s2: 10/24"
    assert naming["small"][2] == "30.6%"  # (5 + 7 + 10) / 3 / 24
    assert naming["small"][4].startswith("22/72 = 30.6% [")
    retention = table(md, "### Control retention vs the baseline")
    assert retention["small"][1] == "s0: 10/10; s1: 9/10; s2: 7/10" and retention["small"][2] == "86.7%"
    assert retention["base"][1] == "0/0" and retention["base"][2] == "n/a"

    # Seed-matched large vs small: the sign test on the target pictures of each seed.
    rows = table(md, "### Variant against variant, seed-matched")
    for seed in (0, 1, 2):
        small, large = (load_run(out / f"{v}-s{seed}")["items"] for v in ("small", "large"))
        targets = [[r for r in items.values() if r["role"] == "target" and r["kind"] in ("naming_ru", "naming_en")]
                   for items in (small, large)]
        right = [{r["sha256"] for r in rows_ if r["correct"]} for rows_ in targets]  # both languages agree here
        gained, lost = len(right[1] - right[0]), len(right[0] - right[1])
        row = rows[f"large-s{seed}"]
        assert row[1] == f"small-s{seed}" and (int(row[4]), int(row[5])) == (gained, lost)
        assert float(row[6]) == pytest.approx(mcnemar_exact(lost, gained), rel=1e-3)
    assert rows["large-s0"][7] == "rose significantly"  # 14 vs 5 of 24 pictures, 9 gained, none lost
    differences = table(md, "Seed-matched differences")
    assert differences["large - small"][2] == "+37.5 pp; +41.7 pp; +20.8 pp"  # (14-5, 17-7, 15-10) / 24
    against_base = table(md, "### Against the baseline")
    assert against_base["small-s2"][13].startswith("7/10 = 70.0% [")
    # 5 target pictures gained of 24 (p = 0.0625), 7 (p = 0.016), 10 (p = 0.002): two of three.
    assert "small vs base: target naming rose significantly in 2, fell significantly in 0 of 3 runs" in md


# ---- the shipped series files

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def shipped(name: str, dataset_root: Path, tmp_path: Path) -> Path:
    """experiments/<name>.yaml with `data` pointed at the test dataset (the real one is built on
    a Mac, the demo's by `cultvlm demo`), everything else as shipped."""
    raw = yaml.safe_load((EXPERIMENTS / name).read_text(encoding="utf-8"))
    assert (raw["data"], raw["catalog"]) in {("datasets/culture", "data/entities.json"),
                                             ("demo/dataset", "demo/catalog.json")}
    raw.update(data=str(dataset_root), catalog=CATALOG)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def test_shipped_series_files_are_valid(dataset, tmp_path):
    series = load_series(shipped("qwen-3b-vs-7b.yaml", dataset[0], tmp_path))
    runs, _ = plan(series, tmp_path / "a")
    assert len(series.seeds) >= 3 and len(runs) == 2 + 2 * len(series.seeds)
    small, large = series.group("3b"), series.group("7b")
    assert (small.model, large.model) == ("3b-4bit", "7b-4bit") and large.compare_with == "3b"
    assert {k: v for k, v in small.train.items() if k != "model"} == {k: v for k, v in large.train.items() if k != "model"}
    assert "lm_head" not in small.train["targets"]  # 3B ties it: training would refuse it
    assert (small.baseline, large.baseline) == ("base-3b", "base-7b")

    series = load_series(shipped("ablations.yaml", dataset[0], tmp_path))
    runs, mixes = plan(series, tmp_path / "b")
    assert series.group("base-candidates").prompt == "candidates"
    # The reference-pictures baseline records the pictures it shows: one training picture per entity.
    references = next(r for r in runs if r.name == "base-references").settings["eval"]["references"]
    assert [label.split(" (")[0] for _, label in references] == ["Чебурашка", "Старуха Шапокляк", "Колобок", "Пикачу"]
    assert all(Path(path).is_file() and "/train/" in path for path, _ in references)
    default = series.group("default")
    changed = {g.name: sorted(k for k in g.train if g.train[k] != default.train[k]) + (["mix"] if g.mix != default.mix else [])
               for g in series.groups if g.kind == "variant" and g is not default}
    assert changed == {"rank-4": ["alpha", "rank"], "rank-64": ["alpha", "rank"], "attention-only": ["targets"],
                       "mlp-only": ["targets"], "mix-naming": ["mix"], "mix-facts": ["mix"],
                       "mix-negatives": ["mix"], "no-replay": ["mix"]}
    assert series.group("no-replay").mix == [k for k in default.mix if k != "replay"]
    result = CliRunner().invoke(command, [str(tmp_path / "ablations.yaml"), "--out", str(tmp_path / "b"), "--dry-run"])
    assert result.exit_code == 0 and "mix-negatives-s2: new" in result.output
    assert not (tmp_path / "b").exists()  # a dry run writes nothing


def test_tiny_offline_series_pits_the_two_shipped_bases_against_each_other(dataset, tmp_path):
    """The offline stand-in for 3B vs 7B: the demo base against the larger one, trained alike."""
    from mlx_cultvlm.demo import BASE_DIR, LARGE_BASE_DIR

    series = load_series(shipped("tiny-offline.yaml", dataset[0], tmp_path))
    runs, _ = plan(series, tmp_path / "t")
    small, large = series.group("small"), series.group("large")
    assert (Path(small.model).resolve(), Path(large.model).resolve()) == (BASE_DIR, LARGE_BASE_DIR)
    assert {k: v for k, v in small.train.items() if k != "model"} == {k: v for k, v in large.train.items() if k != "model"}
    assert len(series.seeds) >= 3 and large.compare_with == "small"
    assert (small.baseline, large.baseline) == ("base-small", "base-large")
    assert [g.prompt for g in series.groups if g.kind == "baseline"] == ["plain", "plain", "candidates", "reference_images"]
    assert len(runs) == 4 + 2 * len(series.seeds)
