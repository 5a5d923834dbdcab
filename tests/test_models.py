"""Presets, model resolution, the real architectures, and the README/CI contract."""

from pathlib import Path

from mlx.utils import tree_flatten

from mlx_cultvlm.models import PRESETS, build_random_model, models_dir, real_config, resolve_model

ROOT = Path(__file__).resolve().parent.parent


def test_presets_map_to_the_qwen_repos():
    assert PRESETS["7b-4bit"].hf_repo == "Qwen/Qwen2.5-VL-7B-Instruct" and PRESETS["7b-4bit"].bits == 4
    assert PRESETS["3b"].hf_repo == "Qwen/Qwen2.5-VL-3B-Instruct" and PRESETS["3b"].bits is None
    assert PRESETS["3b-8bit"].bits == 8
    assert {"tiny", "tiny-4bit"} <= set(PRESETS)


def test_models_dir_override_order(monkeypatch, tmp_path):
    monkeypatch.setenv("CULTVLM_MODELS_DIR", str(tmp_path / "env"))
    assert models_dir() == tmp_path / "env"
    assert models_dir(tmp_path / "flag") == tmp_path / "flag"
    monkeypatch.delenv("CULTVLM_MODELS_DIR")
    monkeypatch.setenv("CULTVLM_HOME", str(tmp_path / "home"))
    assert models_dir() == tmp_path / "home" / "models"
    assert resolve_model(str(tmp_path)) == tmp_path  # a folder is taken as it is


def test_real_architectures_have_the_published_parameter_counts():
    for size, total in (("3b", 3_754_622_976), ("7b", 8_292_166_656)):
        model = build_random_model(real_config(size))  # lazy: nothing is allocated
        assert sum(p.size for _, p in tree_flatten(model.parameters())) == total


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = next(line.strip() for line in readme.splitlines() if "pytest" in line and "pip install" in line)
    assert command in ci
