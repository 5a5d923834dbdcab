"""The demo: its shipped base model uses the image, and the pipeline runs end to end.

The full demo (`cultvlm demo`, ~15 minutes) runs with CULTVLM_FULL_DEMO=1; CI runs a shortened
one (fewer pictures, fewer LoRA steps) through the same code."""

import json
import os
import warnings

import numpy as np
import pytest

from mlx_cultvlm.cli import main
from mlx_cultvlm import characters
from mlx_cultvlm.data.catalog import Entity
from mlx_cultvlm.demo import BASE_DIR, IMAGE_SIZE, LARGE_BASE_DIR, THRESHOLDS, run_demo
from mlx_cultvlm.data.questions import EVAL_QUESTIONS
from mlx_cultvlm.evaluate import generate_answers
from mlx_cultvlm.metrics import naming
from mlx_cultvlm.report import fig_text
from mlx_cultvlm.vlm import load_model
from mlx_cultvlm.score import AnswerScorer

CATALOG = {raw["id"]: Entity(**raw) for raw in characters.DEMO_CATALOG["entities"]}
FRESH_SEED = 4242  # pictures neither the base's training nor the demo's data ever drew


@pytest.mark.parametrize("base", [BASE_DIR, LARGE_BASE_DIR], ids=["demo_base", "demo_base_large"])
def test_the_base_names_controls_from_the_picture_and_knows_no_target(tmp_path, base):
    """Two thirds of the base's training answers were the generic one: a model that ignored the
    picture would say it to everything. This one names each control and no target."""
    model, processor = load_model(str(base))
    scorer = AnswerScorer(CATALOG)
    items = []
    for entity_id, paths in characters.write_images(tmp_path, per_entity=8, seed=FRESH_SEED,
                                                    size=IMAGE_SIZE).items():
        for lang in ("ru", "en"):  # the held-out phrasings eval asks
            items += [{"image": str(p), "prompt": EVAL_QUESTIONS["naming"][lang][n % 2], "entity": entity_id}
                      for n, p in enumerate(paths)]
    answers = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sharing logits processor")
        for i in range(0, len(items), 24):
            answers += generate_answers(model, processor, items[i:i + 24], 16, 3136, IMAGE_SIZE ** 2)
    named = [scorer.named(a) for a in answers]
    controls = [n == i["entity"] for n, i in zip(named, items) if CATALOG[i["entity"]].role == "control"]
    targets = [n is None for n, i in zip(named, items) if CATALOG[i["entity"]].role == "target"]
    assert np.mean(controls) >= 0.9, (np.mean(controls), answers[:6])
    assert np.mean(targets) >= 0.9, np.mean(targets)


@pytest.mark.parametrize("base", [BASE_DIR, LARGE_BASE_DIR], ids=["demo_base", "demo_base_large"])
def test_the_shipped_base_records_how_it_was_built(base):
    import hashlib

    built = json.loads((base / "demo_base.json").read_text())
    assert built["vision_held_out"]["held_out_n"] > 0
    for name, digest in built["weights_sha256"].items():
        assert hashlib.sha256((base / name).read_bytes()).hexdigest() == digest


def test_the_large_base_has_the_demo_base_vision_tower_and_a_larger_language_model():
    import mlx.core as mx
    from mlx.utils import tree_flatten

    built = json.loads((LARGE_BASE_DIR / "demo_base.json").read_text())
    assert built["vision_from"]["path"] == "data/demo_base"
    assert built["vision_from"]["sha256"] == json.loads((BASE_DIR / "demo_base.json").read_text())["weights_sha256"]
    small, _ = load_model(str(BASE_DIR))
    large, _ = load_model(str(LARGE_BASE_DIR))
    tower = dict(tree_flatten(small.vision_tower.parameters()))
    assert all(mx.array_equal(tower[k], v).item() for k, v in tree_flatten(large.vision_tower.parameters()))
    assert (len(small.language_model.model.layers), len(large.language_model.model.layers)) == (2, 4)


def _check_run(out, passed, output):
    base = json.loads((out / "runs" / "base" / "metrics.json").read_text())
    tuned = json.loads((out / "runs" / "tuned" / "metrics.json").read_text())
    report = (out / "report" / "report.html").read_text()
    assert "<img" in report
    figures = {"base": {"targets": naming(base, "target"), "controls": naming(base, "control")},
               "tuned": {"targets": naming(tuned, "target"), "retention": tuned["baseline"]["retention"],
                         "fact": tuned["roles"]["target"]["fact"], "verify": tuned["roles"]["target"]["verify"],
                         "false_positives": tuned["restraint"]["false_positives_on_negatives"]}}
    assert {run for _, run, *_ in THRESHOLDS} == {"base", "tuned"}
    assert {key for _, _, key, *_ in THRESHOLDS} == {"targets", "controls", "retention", "fact", "verify",
                                                     "false_positives"}
    # The held-out design: asked the naming questions, on its own pictures, shown in the report.
    new_design = json.loads((out / "runs" / "tuned-new-design" / "metrics.json").read_text())
    assert naming(new_design, "target")["n"] == 6 * 16
    assert "model names the targets in the held-out design: " + fig_text(naming(new_design, "target")) in output
    assert "Naming on other pictures: base-new-design, tuned-new-design" in report
    assert report.index("Headline") < report.index("Overall")
    assert "Training loss per step" in report  # the tuned run is a fused model: fuse kept the adapter's log
    verdicts = []
    for what, run, key, direction, value in THRESHOLDS:
        fig = figures[run][key]
        ok = fig["n"] > 0 and (fig["value"] <= value if direction == "at most" else fig["value"] >= value)
        verdicts.append(ok)
        # The summary line states the measured figure, its n, and the verdict the numbers give.
        assert f"{'PASS' if ok else 'FAIL'}  {what}: {fig_text(fig)}" in output
    assert passed == all(verdicts)
    return verdicts


def test_shortened_demo_runs_every_step_and_reports_honestly(tmp_path, capsys):
    out = tmp_path / "demo"
    passed = run_demo(main, out, lora_steps=40, pictures={"target": 10, "control": 20, "negative": 5})  # 12 control test pictures
    output = capsys.readouterr().out
    for step in ("data check", "data caption", "data build", "eval", "fuse", "compare"):
        assert f"$ cultvlm {step}" in output
    from mlx_cultvlm.demo import LAUNCH, training_ranks

    # On this 2-core CPU the LoRA step runs as two data-parallel processes, and says so.
    assert (f"$ {LAUNCH} -- cultvlm lora " if training_ranks() == 2 else "$ cultvlm lora ") in output
    verdicts = _check_run(out, passed, output)
    assert verdicts[:2] == [True, True]  # the base's figures do not depend on the demo's training
    with pytest.raises(Exception, match="other settings"):
        run_demo(main, out, lora_steps=41, pictures={"target": 10, "control": 20, "negative": 5})


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CULTVLM_FULL_DEMO"), reason="the full demo (~15 min): CULTVLM_FULL_DEMO=1")
def test_full_demo_meets_every_threshold(tmp_path, capsys):
    passed = run_demo(main, tmp_path / "demo")
    output = capsys.readouterr().out
    assert all(_check_run(tmp_path / "demo", passed, output)), output[-2000:]


def test_a_base_takes_its_vision_tower_from_a_built_base_folder():
    """The larger base (`build_demo_base.py --size large`) starts from the shipped base's tower."""
    import sys

    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    sys.path.insert(0, str(BASE_DIR.parent.parent / "scripts"))
    from build_demo_base import load_tower

    shipped, _ = load_model(str(BASE_DIR))
    other, _ = load_model(str(BASE_DIR))
    other.vision_tower.update(tree_map(mx.zeros_like, other.vision_tower.parameters()))
    load_tower(other, BASE_DIR)
    pairs = zip(tree_flatten(shipped.vision_tower.parameters()), tree_flatten(other.vision_tower.parameters()))
    checked = [np.array_equal(np.array(a), np.array(b)) for (_, a), (_, b) in pairs]
    assert checked and all(checked)


def test_the_demo_trains_with_two_processes_on_a_multi_core_cpu_only(monkeypatch):
    import mlx.core as mx

    from mlx_cultvlm import demo, evaluate

    monkeypatch.setattr(evaluate, "cpu_cores", lambda: 2)
    assert demo.training_ranks() == (2 if mx.default_device() == mx.cpu else 1)
    monkeypatch.setattr(evaluate, "cpu_cores", lambda: 1)
    assert demo.training_ranks() == 1
    monkeypatch.setattr(evaluate, "cpu_cores", lambda: 8)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))  # Metal or CUDA: one process
    assert demo.training_ranks() == 1


def test_a_failing_training_rank_fails_the_step_and_stops_the_others(tmp_path):
    from mlx_cultvlm.demo import launch
    from mlx_cultvlm.errors import CultvlmError

    with pytest.raises(CultvlmError, match=r"training rank\(s\) \[0, 1\] failed"):
        launch(["lora", "--no-such-option"], tmp_path / "ranks.log")
    assert "no-such-option" in (tmp_path / "ranks.log").read_text()
