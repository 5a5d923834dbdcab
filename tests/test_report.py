"""`cultvlm compare`: planted run folders -> report.md / report.html / figures, checked against
the numbers in metrics.json, with an analysis that claims only what the numbers show."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mlx_cultvlm.files import write_json
from mlx_cultvlm.metrics import KINDS, compute_metrics
from mlx_cultvlm.report import command
from test_metrics import pred

ENTITIES = {"cheburashka": "target", "gena": "target", "mickey_mouse": "control"}
FIGURE = re.compile(r"(\d+(?:\.\d)?)/(\d+) = (\d+\.\d)% \[(\d+\.\d), (\d+\.\d)\]")


def write_catalog(path: Path) -> Path:
    names = {"cheburashka": ("Чебурашка", "Cheburashka"),
             "gena": ("Крокодил Гена", "Gena the Crocodile"),
             "mickey_mouse": ("Микки Маус", "Mickey Mouse")}
    write_json(path, {"entities": [{"id": e, "names": {"ru": [ru], "en": [en]}, "role": ENTITIES[e]}
                                   for e, (ru, en) in names.items()]})
    return path


def make_dataset(root: Path, images: range) -> Path:
    for n, entity in enumerate(ENTITIES):
        for i in images:
            path = root / "images" / entity / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.full((24, 32, 3), (60 * n, 5 * i % 256, 120), np.uint8)
            Image.fromarray(pixels).save(path)
    return root


def write_run(folder: Path, dataset: Path, rule, images: range = range(12), adapter: Path | None = None,
              catalog: Path | None = None) -> Path:
    """A run folder as `cultvlm eval` leaves it; rule(entity, kind, index) -> (correct, named)."""
    rows = []
    for entity, role in ENTITIES.items():
        for i in images:
            for kind in KINDS:
                correct, named = rule(entity, kind, i)
                extra = {"named": named, "target_named": ENTITIES.get(named) == "target"} if named else {}
                rows.append(pred(entity, role, kind, correct, i, **extra))
    folder.mkdir(parents=True)
    write_json(folder / "run.json", {
        "model": "tiny-4bit", "adapter": str(adapter) if adapter else None, "dataset": str(dataset),
        "split": "test", "catalog": str(catalog) if catalog else None, "max_pixels": 200704,
        "max_tokens": 64, "items": len(rows), "items_sha256": "x", "started_at": "2025-01-01T00:00:00",
        "finished_at": "2025-01-01T01:00:00"})
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                              encoding="utf-8")
    write_json(folder / "metrics.json", compute_metrics(rows))
    return folder


def base_rule(entity, kind, i):
    if entity == "cheburashka":  # unknown; taken for Mickey on the first 4 pictures
        return False, "mickey_mouse" if i < 4 and kind.startswith("naming") else None
    if entity == "gena":
        return i % 2 == 0, None
    return True, None


def tuned_rule(entity, kind, i):
    if entity == "cheburashka":
        return True, None  # learned: 24 naming answers gained
    if entity == "gena" and kind == "naming_ru" and i in (0, 1):
        return i == 1, None  # one gained, one lost: no change
    if entity == "mickey_mouse" and kind == "naming_ru" and i in (0, 1):
        return False, "cheburashka"  # two lost: p = 0.5; and two false positives
    return base_rule(entity, kind, i)


def forgetful_rule(entity, kind, i):
    if entity == "mickey_mouse" and kind.startswith("naming"):
        return False, None
    return base_rule(entity, kind, i)


@pytest.fixture
def runs(tmp_path):
    catalog = write_catalog(tmp_path / "entities.json")
    dataset = make_dataset(tmp_path / "datasets" / "culture", range(12))
    adapter = tmp_path / "adapters" / "tuned"
    adapter.mkdir(parents=True)
    (adapter / "train_log.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 3.0 / s, "val_loss": 3.5 / s if s % 5 == 0 else None, "lr": 1e-4}) + "\n"
        for s in range(1, 21)))
    return {"base": write_run(tmp_path / "runs" / "base", dataset, base_rule, catalog=catalog),
            "tuned": write_run(tmp_path / "runs" / "tuned", dataset, tuned_rule, adapter=adapter, catalog=catalog),
            "forgetful": write_run(tmp_path / "runs" / "forgetful", dataset, forgetful_rule, catalog=catalog),
            "dataset": dataset, "catalog": catalog, "root": tmp_path}


def compare(*args):
    return CliRunner().invoke(command, [str(a) for a in args])


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell} |")]


def expect(cell: str, fig: dict):
    """The text of a figure equals the figure in metrics.json, to the digits shown."""
    k, n, value, low, high = FIGURE.fullmatch(cell).groups()
    assert (float(k), int(n)) == (round(fig["k"], 1), fig["n"])
    assert float(value) == round(100 * fig["value"], 1)
    assert [float(low), float(high)] == [round(100 * x, 1) for x in fig["ci95"]]


def test_report_base_vs_tuned(runs, tmp_path):
    out = tmp_path / "reports" / "base-vs-tuned"
    result = compare(runs["base"], runs["tuned"], "--out", out)
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text(encoding="utf-8")
    page = (out / "report.html").read_text(encoding="utf-8")

    # Every figure exists, is a real picture, and the HTML needs no other file.
    referenced = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    for name in ("naming_accuracy.png", "confusion.png", "loss.png", "retention.png"):
        assert name in referenced
    for name in referenced:
        with Image.open(out / name) as img:
            img.verify()
    assert len([n for n in referenced if n.startswith("gallery/")]) == 9  # 3 pictures x 3 entities
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == len(referenced) and all(s.startswith("data:image/") for s in sources)

    # The numbers on the page are those in each run's metrics.json and the report's.
    stored = {name: json.loads((runs[name] / "metrics.json").read_text()) for name in ("base", "tuned")}
    report = json.loads((out / "metrics.json").read_text())
    for entity in ENTITIES:
        [row] = table_rows(section(md, "Naming accuracy per entity"), entity)[:1]
        assert row[1] == ENTITIES[entity]
        for cell, name in zip(row[2:], ("base", "tuned")):
            expect(cell, stored[name]["entities"][entity]["naming"])
            expect(cell, report["runs"][name]["metrics"]["entities"][entity]["naming"])
    [overall] = table_rows(section(md, "Overall"), "naming (ru+en)")
    expect(overall[1], stored["base"]["overall"]["naming"])
    expect(overall[2], stored["tuned"]["overall"]["naming"])
    assert overall[1].startswith("18/36 = 50.0% [")  # pictures: gena's 6 of 12 and mickey's 12
    # Restraint and POPE's settings, as metrics.json holds them.
    [fp] = table_rows(section(md, "Restraint: false positives, hedges, hallucinated names"),
                      "false positives: a target named on a control or out-of-catalog picture")
    expect(fp[2], stored["tuned"]["restraint"]["false_positives"])
    assert fp[2].startswith("1/12 = ")  # mickey pictures 0 and 1 named "cheburashka" in one language of two
    [adversarial] = table_rows(section(md, "Verification in POPE's three settings"), "adversarial")
    assert len(adversarial) == 5  # negatives and accuracy of each run
    html_figures = FIGURE.findall(re.sub(r"<[^>]+>", " ", page))
    assert len(html_figures) == len(FIGURE.findall(md))  # the same numbers in both pages
    [retention] = table_rows(md, "all controls")
    expect(retention[1], report["comparisons"][0]["retention"])
    assert retention[1].startswith("11/12 = ")  # mickey's 12 pictures, two lost one of their two names

    # The analysis: "learned" for cheburashka only; the rest is not significant.
    analysis = section(md, "Analysis")
    assert analysis.count("learned") == 1
    lines = {e: next(l for l in analysis.splitlines() if l.startswith(f"- {e} (")) for e in ENTITIES}
    assert "): learned: 0/12 = 0.0%" in lines["cheburashka"] and "p = 0.0004883" in lines["cheburashka"]
    assert "not significant" in lines["gena"] and "p = 1" in lines["gena"]
    assert "not significant" in lines["mickey_mouse"] and "p = 0.5" in lines["mickey_mouse"]
    assert "forgotten" not in analysis
    assert "cheburashka named as mickey_mouse: 8 of 24 naming answers" in analysis
    assert "mickey_mouse named as cheburashka: 2 of 24 naming answers" in analysis
    assert "Чебурашка" in md  # names from the catalog the runs recorded
    assert "right: " in section(md, "Gallery") and "wrong: " in section(md, "Gallery")


def test_three_runs_forgetting_and_consecutive_tests(runs, tmp_path):
    out = tmp_path / "reports" / "three"
    result = compare(runs["base"], runs["tuned"], runs["forgetful"], "--out", out,
                     "--catalog", runs["catalog"])
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text(encoding="utf-8")
    report = json.loads((out / "metrics.json").read_text())
    assert [(c["reference"], c["run"]) for c in report["comparisons"]] == [
        ("base", "tuned"), ("base", "forgetful"), ("tuned", "forgetful")]
    assert "### forgetful vs tuned" in section(md, "Paired tests (exact sign test on pictures)")
    forgetful = section(md, "Analysis").split("### forgetful vs base")[1].split("###")[0]
    assert re.search(r"- mickey_mouse \(control\): forgotten: 12/12 = 100\.0% .* p = 0\.0004883", forgetful)
    assert "learned" not in forgetful and "- cheburashka (target): not significant" in forgetful


def test_runs_over_different_items_compare_on_shared_ones(runs, tmp_path):
    other_data = make_dataset(tmp_path / "datasets" / "other", range(6, 18))
    other = write_run(tmp_path / "runs" / "other", other_data, base_rule, images=range(6, 18))
    out = tmp_path / "reports" / "shared"
    result = compare(runs["base"], other, "--out", out)
    assert result.exit_code == 0, result.output
    message = "compared on the 108 items all runs share, of 324 in all"
    assert message in result.output and message in (out / "report.md").read_text(encoding="utf-8")
    report = json.loads((out / "metrics.json").read_text())
    assert report["runs"]["other"]["metrics"]["items"] == 108 and report["comparisons"][0]["shared"] == 108


def test_runs_sharing_nothing_is_a_one_line_error(runs, tmp_path):
    other = write_run(tmp_path / "runs" / "other", runs["dataset"], base_rule, images=range(100, 102))
    result = compare(runs["base"], other, "--out", tmp_path / "reports" / "none")
    assert result.exit_code == 1
    assert result.output.startswith("Error: the runs share no items") and result.output.count("\n") == 1
    assert not (tmp_path / "reports").exists()


def test_torn_last_line_is_skipped_and_left_alone(runs, tmp_path):
    predictions = runs["tuned"] / "predictions.jsonl"
    with predictions.open("ab") as f:
        f.write(b'{"item_id": "0123456789abcdef:naming_ru", "entity": "chebu')
    before = predictions.read_bytes()
    out = tmp_path / "reports" / "torn"
    result = compare(runs["base"], runs["tuned"], "--out", out)
    assert result.exit_code == 0, result.output
    assert "torn last line" in result.output
    assert predictions.read_bytes() == before  # eval may still be writing: not ours to repair
    report = json.loads((out / "metrics.json").read_text())
    assert report["runs"]["tuned"]["metrics"]["items"] == 216 and not report["notes"]


def test_single_run_and_stale_metrics(runs, tmp_path):
    stored = json.loads((runs["base"] / "metrics.json").read_text())
    stored["overall"]["naming"]["k"] += 1
    write_json(runs["base"] / "metrics.json", stored)
    out = tmp_path / "reports" / "one"
    result = compare(runs["base"], "--out", out)
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "base/metrics.json disagrees with its predictions.jsonl" in md
    assert "One run: nothing to test it against." in md and not (out / "retention.png").exists()
    assert "No run has an adapter folder with train_log.jsonl." in md
    # Run again into the same folder: the report is replaced.
    assert compare(runs["base"], "--out", out).exit_code == 0


def test_refusals(runs, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    result = compare(runs["base"], "--out", busy)
    assert result.exit_code == 1 and "holds notes.txt, which `cultvlm compare` did not write" in result.output
    assert compare(tmp_path, "--out", tmp_path / "r").output.startswith("Error: ")
    result = compare(runs["base"], runs["base"], "--out", tmp_path / "r")
    assert result.exit_code == 1 and "given twice" in result.output


def test_bad_prediction_names_the_file(runs, tmp_path):
    predictions = runs["tuned"] / "predictions.jsonl"
    lines = predictions.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[1] = lines[1].replace('"kind": "naming_en"', '"kind": "caption"')
    predictions.write_text("".join(lines), encoding="utf-8")
    result = compare(runs["base"], runs["tuned"], "--out", tmp_path / "r")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert f"{predictions}: prediction #2" in result.output and "kind must be one of" in result.output


def test_gallery_finds_images_eval_recorded_relative_to_where_it_ran(tmp_path, monkeypatch):
    from mlx_cultvlm.report import _thumbnail

    (tmp_path / "datasets" / "culture" / "images").mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(tmp_path / "datasets" / "culture" / "images" / "a.png")
    monkeypatch.chdir(tmp_path)  # eval ran here with --data datasets/culture
    runs = [{"info": {"dataset": "datasets/culture"}}]
    assert _thumbnail({"image": "datasets/culture/images/a.png"}, runs, tmp_path / "thumb.jpg")
    assert Image.open(tmp_path / "thumb.jpg").size == (40, 30)


def test_the_headline_comes_first_and_states_learned_forgotten_and_false_positives(runs, tmp_path):
    out = tmp_path / "reports" / "headline"
    result = compare(runs["base"], runs["forgetful"], "--out", out)
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text(encoding="utf-8")
    assert md.index("## Headline") < md.index("## Runs") < md.index("## Overall")
    headline = section(md, "Headline")
    stored = {name: json.loads((runs[name] / "metrics.json").read_text()) for name in ("base", "forgetful")}
    [targets] = table_rows(headline, "targets named")
    expect(targets[1], stored["base"]["roles"]["target"]["naming"])
    expect(targets[2], stored["forgetful"]["roles"]["target"]["naming"])
    [fp] = table_rows(headline, "a target named on a control picture (false positive)")
    expect(fp[1], stored["base"]["restraint"]["false_positives_on_controls"])
    assert "learned (naming rose significantly) none; targets not learned cheburashka, gena; " \
           "forgotten (control naming fell significantly) mickey_mouse" in headline


def test_runs_on_other_pictures_get_their_own_section(runs, tmp_path):
    """`--also`: a held-out design of the same characters, say -- other items, so not paired."""
    other = runs["root"] / "runs"
    new_base = write_run(other / "base-new", runs["dataset"], base_rule, images=range(20, 26), catalog=runs["catalog"])
    new_tuned = write_run(other / "tuned-new", runs["dataset"], tuned_rule, images=range(20, 26),
                          catalog=runs["catalog"])
    out = tmp_path / "reports" / "also"
    result = compare(runs["base"], runs["tuned"], "--also", new_base, "--also", new_tuned, "--out", out)
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text(encoding="utf-8")
    part = section(md, "Naming on other pictures: base-new, tuned-new")
    stored = json.loads((new_tuned / "metrics.json").read_text())
    [targets] = table_rows(part, "targets")
    expect(targets[2], stored["roles"]["target"]["naming"])
    assert targets[2].startswith("9/12 = ")  # cheburashka's 6 pictures right, gena's even ones
    [row] = table_rows(part, "cheburashka (target)")
    expect(row[2], stored["entities"]["cheburashka"]["naming"])
    assert "naming_other_pictures.png" in md
    assert "tuned-new (other pictures, see below): targets named 9/12 = " in section(md, "Headline")
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["also"]) == {"base-new", "tuned-new"} and set(report["runs"]) == {"base", "tuned"}


def test_a_fused_model_s_run_shows_the_loss_of_the_adapter_it_merged(runs, tmp_path):
    fused = tmp_path / "models" / "fused"
    fused.mkdir(parents=True)
    (fused / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in (1, 2, 3)))
    run = write_run(tmp_path / "runs" / "fused-run", runs["dataset"], tuned_rule, catalog=runs["catalog"])
    info = json.loads((run / "run.json").read_text())
    write_json(run / "run.json", info | {"model": str(fused)})
    out = tmp_path / "reports" / "fused"
    result = compare(runs["base"], run, "--out", out)
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "fused-run: final train loss 0.6667 at step 3 (3 logged steps)" in md and "loss.png" in md


def _screenshot_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_report.py"
    spec = importlib.util.spec_from_file_location("screenshot_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_screenshot_script_skips_with_a_message_when_no_browser_is_installed(runs, tmp_path, monkeypatch,
                                                                                capsys):
    script = _screenshot_script()
    out = tmp_path / "report"
    assert compare(runs["base"], runs["tuned"], "--out", out).exit_code == 0
    monkeypatch.setattr(script.shutil, "which", lambda name: None)
    assert script.main([str(out / "report.html")]) == 0
    assert "no browser found" in capsys.readouterr().out and not (out / "screenshot.png").exists()
    assert script.main([str(tmp_path / "missing.html")]) == 1


@pytest.mark.skipif(_screenshot_script().find_browser() is None, reason="no Chromium installed")
def test_the_screenshot_shows_the_headline(runs, tmp_path):
    script = _screenshot_script()
    out = tmp_path / "report"
    assert compare(runs["base"], runs["tuned"], "--out", out).exit_code == 0
    assert script.main([str(out / "report.html"), "--out", str(tmp_path / "first.png")]) == 0
    with Image.open(tmp_path / "first.png") as shot:
        assert shot.size == (1400, 900)
        pixels = np.asarray(shot.convert("L"))
    assert (pixels < 128).mean() > 0.01  # text was drawn, not a blank page
