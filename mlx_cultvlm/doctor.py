"""`cultvlm doctor`: what MLX runs on here, and how to make it faster.

On a Mac MLX runs on the Metal GPU and there is nothing to tune. On Linux the mlx-cpu wheel
links a bundled reference (netlib) BLAS, so float32 matmuls crawl. An OpenBLAS that exports
`cblas_sgemm`, loaded with LD_PRELOAD, takes its place: the dynamic linker searches the global
scope (LD_PRELOAD first) before the wheel's own libraries. bfloat16/float16 and quantized
matmuls never call BLAS, so they gain nothing. The preload stays opt-in: docs/PERFORMANCE.md.

Nothing here changes how cultvlm runs: doctor only looks, times two short matmuls and, where
the reference BLAS is in use and an OpenBLAS is installed, times it once in a child process.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import click

PACKAGES = ("mlx", "mlx-vlm", "mlx-lm", "transformers")
BENCH_N = 512  # 2*512^3 = 0.27 GFLOP: ~0.07 s on the reference BLAS, well under 1 ms on a GPU
INSTALL_HINT = "sudo apt-get install libopenblas0-pthread"


def debian_openblas_path() -> str:
    """Where Debian/Ubuntu's libopenblas0-* packages put the library (via alternatives)."""
    return f"/usr/lib/{platform.machine()}-linux-gnu/libopenblas.so.0"


# ---- which BLAS MLX calls

class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _file_of(address: int) -> str | None:
    """The shared object that holds `address` (dladdr)."""
    libc = ctypes.CDLL(None)
    dladdr = getattr(libc, "dladdr", None) or ctypes.CDLL("libdl.so.2").dladdr
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    info = _DlInfo()
    if dladdr(ctypes.c_void_p(address), ctypes.byref(info)) and info.dli_fname:
        return os.fsdecode(info.dli_fname)
    return None


def _mapped_blas() -> list[str]:
    """BLAS-like libraries mapped into this process (/proc/self/maps), real paths."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    names = ("blas", "lapack", "mkl", "blis")
    return sorted({line.split()[-1] for line in lines
                   if "/" in line and any(n in line.split()[-1].rsplit("/", 1)[-1].lower() for n in names)})


def _openblas_info(path: str) -> dict | None:
    """Version, core (kernel set) and threads of an OpenBLAS already loaded from `path`."""
    try:
        lib = ctypes.CDLL(path)  # already mapped: same handle, no second copy
        get_config, get_core = lib.openblas_get_config, lib.openblas_get_corename
    except (OSError, AttributeError):
        return None
    get_config.restype = get_core.restype = ctypes.c_char_p
    config = get_config().decode(errors="replace")  # "OpenBLAS 0.3.21 DYNAMIC_ARCH ... Prescott ..."
    words = config.split()
    return {"version": words[1] if len(words) > 1 and words[0] == "OpenBLAS" else config,
            "core": get_core().decode(errors="replace"),
            "threads": int(lib.openblas_get_num_threads())}


def blas_in_use() -> dict:
    """The library MLX's `cblas_sgemm` binds to in this process.

    libmlx is loaded (by Python, RTLD_LOCAL) with its bundled libblas as a dependency; the
    dynamic linker looks a symbol up in the global scope (executable, LD_PRELOAD, RTLD_GLOBAL
    libraries) before that local one. So: a `cblas_sgemm` in the global scope wins; else the
    wheel's bundled library is used.
    """
    importlib.import_module("mlx.core")  # maps libmlx and its BLAS

    preload = os.environ.get("LD_PRELOAD", "")
    info = {"library": None, "kind": "unknown", "via": None, "ld_preload": preload or None,
            "openblas": None, "mapped": []}
    if not sys.platform.startswith("linux"):
        info["kind"] = "accelerate" if sys.platform == "darwin" else "unknown"
        return info
    info["mapped"] = _mapped_blas()
    try:
        address = ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
    except AttributeError:
        address = None
    if address:
        path = _file_of(address)
        preloaded = {os.path.realpath(p) for p in preload.replace(":", " ").split()}
        info["via"] = "LD_PRELOAD" if path and os.path.realpath(path) in preloaded else "global"
    else:  # nothing global: the library the wheel ships next to libmlx
        bundled = [p for p in info["mapped"] if "mlx" in p and "blas" in p.rsplit("/", 1)[-1].lower()]
        path = bundled[0] if bundled else None
        info["via"] = "bundled"
    info["library"] = path
    if path:
        info["openblas"] = _openblas_info(path)
        name = path.rsplit("/", 1)[-1].lower()
        if info["openblas"]:
            info["kind"] = "openblas"
        elif "mkl" in name:
            info["kind"] = "mkl"
        elif "blis" in name:
            info["kind"] = "blis"
        elif name.startswith("libblas"):
            info["kind"] = "reference"  # netlib: the mlx-cpu wheel's, or Debian's libblas3
        else:
            info["kind"] = "other"
    return info


# ---- timing

def matmul_gflops(dtype: str = "float32", n: int = BENCH_N, budget_s: float = 0.25) -> float:
    """Best-of timing of an n x n matmul on the default device, in GFLOP/s."""
    import mlx.core as mx

    dt = getattr(mx, dtype)
    a = mx.random.normal((n, n), key=mx.random.key(0)).astype(dt)
    b = mx.random.normal((n, n), key=mx.random.key(1)).astype(dt)
    mx.eval(a, b, a @ b)  # warm-up
    best, spent, reps = float("inf"), 0.0, 0
    while reps < 2 or (spent < budget_s and reps < 200):
        start = time.perf_counter()
        mx.eval(a @ b)
        took = time.perf_counter() - start
        best, spent, reps = min(best, took), spent + took, reps + 1
    return round(2 * n ** 3 / best / 1e9, 1)


# ---- an installed OpenBLAS, tried in a child process

def openblas_candidates() -> list[str]:
    """Installed OpenBLAS libraries (the usual places, then ldconfig -p), existing files only."""
    machine = platform.machine()
    found = [debian_openblas_path(),
             f"/usr/lib/{machine}-linux-gnu/openblas-pthread/libopenblas.so.0",
             f"/usr/lib/{machine}-linux-gnu/openblas-openmp/libopenblas.so.0",
             "/usr/lib64/libopenblas.so.0", "/usr/lib64/libopenblasp.so.0",
             "/usr/lib64/libopenblaso.so.0", "/usr/lib/libopenblas.so.0"]
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
        found += [line.split("=>")[-1].strip() for line in out.splitlines()
                  if "libopenblas" in line and "=>" in line]
    except (OSError, subprocess.SubprocessError):
        pass
    if os.environ.get("CONDA_PREFIX"):
        found.append(os.path.join(os.environ["CONDA_PREFIX"], "lib", "libopenblas.so.0"))
    out, seen = [], set()
    for path in found:
        # ILP64 builds (libopenblas64_) export cblas_sgemm64_ etc.: no use to MLX.
        if "64_" in path.rsplit("/", 1)[-1] or not os.path.isfile(path):
            continue
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            out.append(path)
    return out


def cpu_coretype(flags: set[str] | None = None) -> str | None:
    """The OPENBLAS_CORETYPE this x86-64 CPU can run, from its /proc/cpuinfo flags."""
    if flags is None:
        flags = set()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
        except OSError:
            return None
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def probe(library: str | None = None, coretype: str | None = None, timeout: int = 120) -> dict:
    """blas_in_use() and the float32 GFLOP/s of a fresh Python with `library` preloaded."""
    env = dict(os.environ)
    env.pop("OPENBLAS_CORETYPE", None)
    if library:
        env["LD_PRELOAD"] = library
    else:
        env.pop("LD_PRELOAD", None)
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH")]))
    code = "from mlx_cultvlm.doctor import _probe_main; _probe_main()"
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              timeout=timeout)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _probe_main() -> None:
    print(json.dumps({"blas": blas_in_use(), "float32_gflops": matmul_gflops("float32")}))


def try_openblas(current_gflops: float) -> dict | None:
    """The first installed OpenBLAS that MLX really binds to when preloaded, timed; with
    OPENBLAS_CORETYPE when its own CPU detection fell back to generic kernels and that is faster."""
    for path in openblas_candidates():
        result = probe(path)
        blas = result.get("blas") or {}
        if blas.get("kind") != "openblas" or blas.get("via") != "LD_PRELOAD":
            continue  # does not load, or does not export cblas_sgemm
        tried = {"library": path, "openblas": blas["openblas"], "coretype": None,
                 "float32_gflops": result["float32_gflops"]}
        better = _better_coretype(path, blas["openblas"], tried["float32_gflops"])
        if better:
            tried.update(better, own_core=blas["openblas"]["core"],
                         own_core_float32_gflops=result["float32_gflops"])
        tried["speedup"] = round(tried["float32_gflops"] / max(current_gflops, 1e-9), 1)
        return tried
    return None


def _better_coretype(path: str, openblas: dict | None, gflops: float) -> dict | None:
    """OpenBLAS < 0.3.25 runs its generic 'Prescott' kernels on Intel CPUs newer than itself
    (OpenMathLib/OpenBLAS#4267). Forcing the core the CPU's flags allow fixes that."""
    coretype = cpu_coretype()
    if not openblas or openblas.get("core") != "Prescott" or not coretype:
        return None
    result = probe(path, coretype)
    blas = result.get("blas") or {}
    if blas.get("kind") == "openblas" and result.get("float32_gflops", 0) > 1.3 * gflops:
        return {"coretype": coretype, "openblas": blas["openblas"],
                "float32_gflops": result["float32_gflops"]}
    return None


# ---- report and advice

def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def collect(bench: bool = True) -> dict:
    import mlx.core as mx

    metal = bool(mx.metal.is_available())
    memory = {"total_ram_gb": None, "metal_working_set_gb": None}
    try:
        memory["total_ram_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    gpu = None
    if metal:  # Metal-only calls: never reached on Linux
        info = mx.device_info()
        if info.get("max_recommended_working_set_size"):
            memory["metal_working_set_gb"] = round(info["max_recommended_working_set_size"] / 2**30, 1)
        gpu = info.get("architecture")
    report = {
        "platform": {"system": platform.system(), "machine": platform.machine(),
                     "python": platform.python_version()},
        "backend": {"metal": metal, "gpu": gpu, "default_device": mx.default_device().type.name},
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}},
        "memory": memory,
        "blas": blas_in_use(),
        "matmul_gflops": None,
        "openblas_available": None,
        "command_prefix": None,
        "advice": [],
    }
    if bench:
        report["matmul_gflops"] = {"n": BENCH_N, "device": report["backend"]["default_device"],
                                   "float32": matmul_gflops("float32"),
                                   "bfloat16": matmul_gflops("bfloat16")}
    blas = report["blas"]
    on_cpu = report["backend"]["default_device"] == "cpu"
    if on_cpu and bench and sys.platform.startswith("linux"):
        if blas["kind"] == "reference":
            report["openblas_available"] = try_openblas(report["matmul_gflops"]["float32"])
        elif blas["kind"] == "openblas":
            better = _better_coretype(blas["library"], blas["openblas"], report["matmul_gflops"]["float32"])
            if better:
                report["openblas_available"] = {"library": blas["library"], **better}
    report["advice"], report["command_prefix"] = advise(report)
    return report


def advise(report: dict) -> tuple[list[str], str | None]:
    """Advice lines and the environment prefix to put before `cultvlm` (None: nothing to add)."""
    blas, speed = report["blas"], report.get("matmul_gflops") or {}
    found = report.get("openblas_available")
    if report["backend"]["metal"]:
        return ["Metal GPU: matmuls run on the GPU; the CPU BLAS does not matter."], None
    if report["backend"].get("default_device") == "gpu":
        return ["GPU backend: matmuls run on the GPU; the CPU BLAS does not matter."], None
    if report["platform"]["system"] != "Linux":
        return ["No Metal GPU: MLX runs on the CPU."], None
    lines, prefix = [], None
    f32 = speed.get("float32")
    if blas["kind"] == "reference":
        if blas.get("ld_preload"):
            lines.append(f"LD_PRELOAD={blas['ld_preload']} is set, but MLX still uses the reference "
                         "BLAS: that library failed to load or does not export cblas_sgemm.")
        if found:
            prefix = _prefix(found)
            lines.append(f"MLX uses the reference (netlib) BLAS of the mlx-cpu wheel: float32 matmul "
                         f"{f32} GFLOP/s. With the OpenBLAS installed here it runs at "
                         f"{found['float32_gflops']} GFLOP/s ({found['speedup']:.0f}x). Run cultvlm as:")
            lines.append(f"    {prefix} cultvlm ...")
        else:
            lines.append("MLX uses the reference (netlib) BLAS of the mlx-cpu wheel"
                         + (f": float32 matmul {f32} GFLOP/s" if f32 else "")
                         + ". OpenBLAS makes float32 matmuls tens of times faster. On Debian/Ubuntu:")
            lines.append(f"    {INSTALL_HINT}")
            lines.append(f"    LD_PRELOAD={debian_openblas_path()} cultvlm ...")
            lines.append("then run `cultvlm doctor` again (with that LD_PRELOAD) to check.")
    elif blas["kind"] == "openblas":
        core = (blas.get("openblas") or {}).get("core")
        if found and found.get("coretype"):
            prefix = _prefix(found)
            lines.append(f"MLX uses OpenBLAS ({blas['library']}), but its generic '{core}' kernels: "
                         f"this OpenBLAS does not know this CPU. With OPENBLAS_CORETYPE="
                         f"{found['coretype']} float32 matmul goes from {f32} to "
                         f"{found['float32_gflops']} GFLOP/s. Run cultvlm as:")
            lines.append(f"    {prefix} cultvlm ...")
        else:
            lines.append(f"MLX uses OpenBLAS {blas['openblas']['version']} (core {core}) for float32 "
                         "matmuls: nothing to do.")
    elif blas["kind"] in ("mkl", "blis", "other"):
        lines.append(f"MLX uses {blas['library']} for float32 matmuls.")
    else:
        lines.append("Could not tell which BLAS MLX uses.")
    if speed.get("bfloat16") is not None:
        lines.append(f"bfloat16/float16 and 4-bit matmuls do not use BLAS: {speed['bfloat16']} GFLOP/s "
                     "(bfloat16) here, whatever BLAS is loaded. Only float32 weights "
                     "(convert --dtype float32 --bits none) gain from OpenBLAS.")
    return lines, prefix


def _prefix(found: dict) -> str:
    prefix = f"LD_PRELOAD={found['library']}"
    if found.get("coretype"):
        prefix += f" OPENBLAS_CORETYPE={found['coretype']}"
    return prefix


def format_text(report: dict) -> str:
    backend, mem, blas, speed = (report["backend"], report["memory"], report["blas"],
                                 report["matmul_gflops"])
    rows = [("platform", f"{report['platform']['system']} {report['platform']['machine']}, "
                         f"Python {report['platform']['python']}"),
            ("backend", f"default device {backend['default_device']}, Metal "
                        + (f"yes ({backend['gpu']})" if backend["metal"] else "no")),
            ("versions", ", ".join(f"{k} {v or 'not installed'}"
                                   for k, v in report["versions"].items() if k != "python"))]
    memory = f"total RAM {mem['total_ram_gb']} GB"
    if mem["metal_working_set_gb"] is not None:
        memory += f", Metal max recommended working set {mem['metal_working_set_gb']} GB"
    rows.append(("memory", memory))
    what = {"reference": "reference (netlib)", "openblas": "OpenBLAS"}.get(blas["kind"], blas["kind"])
    if blas["openblas"]:
        what += f" {blas['openblas']['version']}, core {blas['openblas']['core']}, " \
                f"{blas['openblas']['threads']} threads"
    if blas["library"]:
        what += f", {blas['via']}: {blas['library']}"
    rows.append(("BLAS", what))
    if blas.get("ld_preload"):
        rows.append(("LD_PRELOAD", blas["ld_preload"]))
    if speed:
        rows.append(("matmul", f"float32 {speed['float32']} GFLOP/s, bfloat16 {speed['bfloat16']} "
                               f"GFLOP/s ({speed['n']}x{speed['n']}, {speed['device']})"))
    found = report.get("openblas_available")
    if found:
        line = (f"{found['library']} ({found['openblas']['version']}, core {found['openblas']['core']}): "
                f"float32 {found['float32_gflops']} GFLOP/s")
        if found.get("coretype"):
            line += f" with OPENBLAS_CORETYPE={found['coretype']}"
        if found.get("own_core"):
            line += f" ({found['own_core_float32_gflops']} with its own choice, {found['own_core']})"
        rows.append(("OpenBLAS", line))
    text = "\n".join(f"{name:<10}  {value}" for name, value in rows)
    return text + "\n\nadvice:\n" + "\n".join(
        line if line.startswith("    ") else f"  {line}" for line in report["advice"])


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
def doctor_command(as_json):
    """Show what MLX runs on here (device, versions, memory, BLAS, matmul speed) and how to
    make it faster."""
    report = collect()
    click.echo(json.dumps(report, indent=2) if as_json else format_text(report))
