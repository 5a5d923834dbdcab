"""`cultvlm doctor`: the report, BLAS detection with and without an OpenBLAS preload, and that
the preload changes float32 results by float rounding only. No timing is asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_cultvlm import doctor
from mlx_cultvlm.doctor import advise, blas_in_use, collect, cpu_coretype, doctor_command, openblas_candidates

ROOT = Path(__file__).resolve().parents[1]
LINUX_CPU = sys.platform.startswith("linux") and not mx.metal.is_available()
needs_linux_cpu = pytest.mark.skipif(not LINUX_CPU, reason="the BLAS question is Linux-CPU only")


def openblas_or_skip() -> str:
    found = openblas_candidates()
    if not found:
        pytest.skip("no OpenBLAS installed here (Debian/Ubuntu: sudo apt-get install libopenblas0-pthread)")
    return found[0]


def run_python(code: str, preload: str | None, *args) -> str:
    """`code` in a fresh Python, with exactly `preload` (or nothing) in LD_PRELOAD."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "OPENBLAS_CORETYPE")}
    if preload:
        env["LD_PRELOAD"] = preload
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def blas_of(preload: str | None) -> dict:
    code = "import json; from mlx_cultvlm.doctor import blas_in_use; print(json.dumps(blas_in_use()))"
    return json.loads(run_python(code, preload).splitlines()[-1])


# ---- the report

def test_json_report_has_the_fields_with_sane_values():
    result = CliRunner().invoke(doctor_command, ["--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report) >= {"platform", "backend", "versions", "memory", "blas", "matmul_gflops",
                           "openblas_available", "command_prefix", "advice"}
    assert report["versions"]["mlx"] == mx.__version__
    assert report["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert all(report["versions"][p] for p in ("mlx-vlm", "mlx-lm"))
    assert report["backend"]["metal"] == mx.metal.is_available()
    assert report["backend"]["default_device"] in ("cpu", "gpu")
    assert 0.1 < report["memory"]["total_ram_gb"] < 100_000
    speed = report["matmul_gflops"]
    assert speed["float32"] > 0 and speed["bfloat16"] > 0
    assert report["advice"] and all(isinstance(line, str) and line for line in report["advice"])
    if LINUX_CPU:
        assert report["memory"]["metal_working_set_gb"] is None
        assert report["blas"]["kind"] in ("reference", "openblas", "mkl", "blis", "other")
        assert report["blas"]["library"] and Path(report["blas"]["library"]).exists()
        assert any("bfloat16" in line for line in report["advice"])
        prefix = report["command_prefix"]
        if prefix:  # a verified command: the library it preloads was timed in a child process
            assert prefix.startswith("LD_PRELOAD=" + report["openblas_available"]["library"])
            assert any(line.strip() == f"{prefix} cultvlm ..." for line in report["advice"])


def test_text_report():
    result = CliRunner().invoke(doctor_command, [])
    assert result.exit_code == 0, result.output
    for label in ("platform", "backend", "versions", "memory", "BLAS", "matmul", "advice:"):
        assert label in result.output
    assert f"mlx {mx.__version__}" in result.output


@needs_linux_cpu
def test_no_metal_call_on_linux(monkeypatch):
    def metal_only(*_, **__):
        raise AssertionError("Metal-only call on Linux")

    monkeypatch.setattr(mx, "device_info", metal_only)
    monkeypatch.setattr(mx.metal, "device_info", metal_only)
    report = collect(bench=False)
    assert report["backend"]["metal"] is False and report["memory"]["metal_working_set_gb"] is None


# ---- which BLAS MLX calls

@needs_linux_cpu
def test_reference_blas_without_preload():
    blas = blas_of(None)
    assert blas["kind"] == "reference" and blas["via"] == "bundled", blas
    assert "mlx" in blas["library"] and blas["openblas"] is None


@needs_linux_cpu
def test_openblas_with_preload():
    library = openblas_or_skip()
    blas = blas_of(library)
    assert blas["kind"] == "openblas" and blas["via"] == "LD_PRELOAD", blas
    assert os.path.realpath(blas["library"]) == os.path.realpath(library)
    assert blas["openblas"]["version"] and blas["openblas"]["core"]
    assert any("openblas" in p.lower() for p in blas["mapped"])


@needs_linux_cpu
def test_numpy_openblas_cannot_stand_in():
    """numpy's bundled OpenBLAS exports only prefixed symbols (scipy_cblas_sgemm...): preloading it
    leaves MLX on the reference BLAS -- and doctor says so."""
    libs = sorted(Path(np.__file__).parent.parent.glob("numpy.libs/*openblas*.so*"))
    if not libs:
        pytest.skip("this numpy bundles no OpenBLAS")
    assert blas_of(str(libs[0]))["kind"] == "reference"


# ---- same numbers, up to float rounding

MATMUL = """
import sys, numpy as np, mlx.core as mx
rng = np.random.default_rng(0)
out = {}
for n in (64, 512):
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    out[f"mm{n}"] = np.array(mx.array(a) @ mx.array(b))
np.savez(sys.argv[1], **out)
"""


@needs_linux_cpu
def test_preload_changes_float32_matmul_by_rounding_only(tmp_path):
    library = openblas_or_skip()
    run_python(MATMUL, None, tmp_path / "ref.npz")
    run_python(MATMUL, library, tmp_path / "openblas.npz")
    ref, ours = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "openblas.npz")
    rng = np.random.default_rng(0)
    for n in (64, 512):
        a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
        exact = a.astype(np.float64) @ b.astype(np.float64)
        scale = np.abs(exact).max()
        # Measured here: ~1.2e-6 of the largest entry for n=512, both against each other and
        # against float64; a wrong kernel or layout would be off by O(1).
        for got in (ref[f"mm{n}"], ours[f"mm{n}"]):
            assert got.dtype == np.float32
            assert np.abs(got - exact).max() < 1e-5 * scale
        assert np.abs(ref[f"mm{n}"] - ours[f"mm{n}"]).max() < 1e-5 * scale


LOGITS = """
import sys, numpy as np, mlx.core as mx, mlx_vlm
model, _ = mlx_vlm.load(sys.argv[1])
x = np.load(sys.argv[2])
out = model(mx.array(x["ids"]), mx.array(x["pixels"]), mask=mx.ones(x["ids"].shape),
            image_grid_thw=mx.array(x["grid"]))
np.save(sys.argv[3], np.array(out.logits))
"""


@needs_linux_cpu
def test_preload_changes_tiny_model_logits_by_rounding_only(tiny_fp32, tmp_path):
    import mlx_vlm

    from conftest import make_image
    from mlx_cultvlm.generate import build_prompt
    from mlx_cultvlm.images import fit_to_budget, load_image

    library = openblas_or_skip()
    model, processor = mlx_vlm.load(str(tiny_fp32))
    image = fit_to_budget(load_image(make_image(tmp_path / "a.png", 308, 224)), max_pixels=308 * 224)
    inputs = processor(images=[image], text=[build_prompt(processor, "Кто это? Who is it?")])
    np.savez(tmp_path / "in.npz", ids=np.array(inputs["input_ids"]), grid=np.array(inputs["image_grid_thw"]),
             pixels=np.array(inputs["pixel_values"], dtype=np.float32))
    if blas_in_use()["kind"] == "reference":  # this process is the reference: spare a child
        x = np.load(tmp_path / "in.npz")
        ref = np.array(model(mx.array(x["ids"]), mx.array(x["pixels"]), mask=mx.ones(x["ids"].shape),
                             image_grid_thw=mx.array(x["grid"])).logits)
    else:
        run_python(LOGITS, None, tiny_fp32, tmp_path / "in.npz", tmp_path / "ref.npy")
        ref = np.load(tmp_path / "ref.npy")
    run_python(LOGITS, library, tiny_fp32, tmp_path / "in.npz", tmp_path / "openblas.npy")
    ours = np.load(tmp_path / "openblas.npy")
    assert ours.shape == ref.shape and ours.dtype == np.float32
    # Measured: max |diff| 5.4e-7 on logits of magnitude ~0.7 (the torch parity test allows 1e-5).
    assert np.abs(ours - ref).max() < 1e-5
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


# ---- advice, from made-up reports (no machine needed)

def fake_report(kind, *, metal=False, system="Linux", found=None, preload=None, core="Haswell"):
    return {"platform": {"system": system}, "backend": {"metal": metal},
            "blas": {"kind": kind, "library": "/x/libopenblas.so.0" if kind == "openblas" else "/x/libblas.so.3",
                     "ld_preload": preload,
                     "openblas": {"version": "0.3.21", "core": core, "threads": 2} if kind == "openblas" else None},
            "matmul_gflops": {"float32": 4.0, "bfloat16": 3.0}, "openblas_available": found}


def test_advice_reference_with_openblas_found():
    found = {"library": "/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "coretype": None,
             "float32_gflops": 200.0, "speedup": 50.0}
    lines, prefix = advise(fake_report("reference", found=found))
    assert prefix == "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
    assert f"    {prefix} cultvlm ..." in lines
    assert any("50x" in line for line in lines)
    found["coretype"] = "SkylakeX"
    assert advise(fake_report("reference", found=found))[1].endswith(" OPENBLAS_CORETYPE=SkylakeX")


def test_advice_reference_without_openblas_says_how_to_install():
    lines, prefix = advise(fake_report("reference"))
    assert prefix is None
    assert "    sudo apt-get install libopenblas0-pthread" in lines
    assert any(line.strip().startswith("LD_PRELOAD=") and line.endswith("cultvlm ...") for line in lines)


def test_advice_broken_preload_and_prescott_fallback():
    lines, _ = advise(fake_report("reference", preload="/nowhere.so"))
    assert "LD_PRELOAD=/nowhere.so is set" in lines[0]
    found = {"library": "/x/libopenblas.so.0", "coretype": "SkylakeX", "float32_gflops": 280.0}
    lines, prefix = advise(fake_report("openblas", core="Prescott", found=found))
    assert prefix == "LD_PRELOAD=/x/libopenblas.so.0 OPENBLAS_CORETYPE=SkylakeX"
    lines, prefix = advise(fake_report("openblas"))
    assert prefix is None and "nothing to do" in lines[0]


def test_advice_on_a_gpu_never_mentions_ld_preload():
    lines, prefix = advise(fake_report("accelerate", metal=True, system="Darwin"))
    assert prefix is None and not any("LD_PRELOAD" in line for line in lines)
    report = fake_report("reference")  # e.g. Linux with a CUDA build of MLX
    report["backend"]["default_device"] = "gpu"
    lines, prefix = advise(report)
    assert prefix is None and not any("LD_PRELOAD" in line for line in lines)


def test_coretype_from_cpu_flags():
    assert cpu_coretype({"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"}) == "SkylakeX"
    assert cpu_coretype({"avx2", "fma", "avx512f"}) == "Haswell"
    assert cpu_coretype({"sse4_2"}) is None


def test_candidates_skip_ilp64_and_missing(monkeypatch, tmp_path):
    good, ilp64 = tmp_path / "libopenblas.so.0", tmp_path / "libopenblas64_.so.0"
    good.touch()
    ilp64.touch()
    monkeypatch.setattr(doctor, "debian_openblas_path", lambda: str(tmp_path / "missing.so.0"))
    monkeypatch.setenv("CONDA_PREFIX", str(tmp_path / "conda"))
    (tmp_path / "conda" / "lib").mkdir(parents=True)
    (tmp_path / "conda" / "lib" / "libopenblas.so.0").symlink_to(good)
    found = openblas_candidates()
    assert str(tmp_path / "missing.so.0") not in found and str(ilp64) not in found
    assert str(tmp_path / "conda" / "lib" / "libopenblas.so.0") in found
