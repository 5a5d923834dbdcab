"""Crash safety with a real `kill -9`: every long-running verb is run as a child process (the
real `cultvlm` command line) and killed with SIGKILL mid-run, then run again.

Two ways to pick the moment of the kill:

- on sight: the test watches the run's output files and kills the process as soon as it sees
  progress (a log line, a hidden partial folder), after a random delay;
- at a point: the child is started through LAUNCHER, which is the same command line plus a
  Python audit hook that stops the process just before a named file operation (say, the
  rename of `.checkpoint.partial` to `checkpoint`) and says so on stderr; the test then kills it
  there. Nothing is simulated: the process dies by SIGKILL with its files in whatever state
  that operation had left them.

After each kill the test checks what a reader would find, then re-runs the command and checks
that the final result equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from conftest import PIXELS

CATALOG = str(Path(__file__).resolve().parent.parent / "data" / "entities.json")

# The `cultvlm` command line, optionally stopped before one file operation and optionally
# sampling its own memory (test_long_runs.py). Arguments follow as for `cultvlm`.
LAUNCHER = r'''
import os, sys, threading, time
from pathlib import Path

def _names(event, args):
    n = 2 if event == "os.rename" else 1
    return ">".join(Path(os.fsdecode(a)).name for a in args[:n])

_point = os.environ.get("CULTVLM_TEST_PAUSE_AT")  # "event|names|n": stop at the n-th such event
if _point:
    _event, _wanted, _nth = _point.split("|")
    _seen = [0]

    def _hook(name, args):
        if name != _event:
            return
        if name == "open" and not (isinstance(args[1], str) and any(c in args[1] for c in "wax")):
            return  # only opens for writing
        if _names(name, args) != _wanted:
            return
        _seen[0] += 1
        if _seen[0] == int(_nth):
            sys.stderr.write(f"\nPAUSED AT {_point}\n")
            sys.stderr.flush()
            time.sleep(3600)

    sys.addaudithook(_hook)

_memory_log = os.environ.get("CULTVLM_TEST_MEMORY_LOG")
if _memory_log:
    def _sample():
        import mlx.core as mx
        with open(_memory_log, "w", buffering=1) as f:
            while True:
                with open("/proc/self/status") as status:
                    rss = next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmRSS:"))
                f.write(f"{time.time():.3f} {rss} {mx.get_active_memory()} {mx.get_cache_memory()}\n")
                time.sleep(0.2)

    threading.Thread(target=_sample, daemon=True).start()

from mlx_cultvlm.cli import main
main(prog_name="cultvlm")
'''

# What a kill may leave beside an output: hidden partial/old folders, hidden temporary files,
# the writer's lock (its process gone, the next writer takes it over: test_errors.py).
HIDDEN_LEFTOVERS = (".partial", ".old", ".partial.safetensors", ".tmp", ".lock")


RUNNING: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_child_left_behind():
    """A failing test must not leave a child paused (asleep in its audit hook) or running."""
    yield
    while RUNNING:
        process = RUNNING.pop()
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)


class Child:
    """One run of the command line in a child process, its output in a file."""

    def __init__(self, args, cwd: Path, pause_at: str | None = None, memory_log: Path | None = None,
                 prefix: list[str] | None = None):
        self.output = Path(cwd) / f".child-{time.monotonic_ns()}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("CULTVLM_TEST_PAUSE_AT", None)
        if pause_at:
            env["CULTVLM_TEST_PAUSE_AT"] = pause_at
        if memory_log:
            env["CULTVLM_TEST_MEMORY_LOG"] = str(memory_log)
        if pause_at or memory_log:
            command = [sys.executable, "-c", LAUNCHER]
        else:
            command = [sys.executable, "-m", "mlx_cultvlm.cli"]  # the plain command line
        self.args = [str(a) for a in args]
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen([*(prefix or []), *command, *self.args], cwd=cwd, env=env,
                                            stdout=out, stderr=subprocess.STDOUT)
        RUNNING.append(self.process)
        self.started = time.time_ns()

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        return self.output.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, condition, timeout: float = 120.0, poll: float = 0.005) -> bool:
        """Poll until condition() holds (True) or the process ends first (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            if self.process.poll() is not None:
                return bool(condition())
            time.sleep(poll)
        self.process.kill()
        raise AssertionError(f"timed out waiting; output:\n{self.text()[-3000:]}")

    def paused(self) -> bool:
        return "PAUSED AT" in self.text()

    def kill9(self, pid: int | None = None) -> None:
        """SIGKILL, and check it was the kill that ended the process."""
        assert self.process.poll() is None, f"finished before the kill:\n{self.text()[-3000:]}"
        os.kill(pid or self.pid, signal.SIGKILL)
        rc = self.process.wait(timeout=60)
        if pid is None:
            assert rc == -signal.SIGKILL, rc

    def finish(self, timeout: float = 300.0) -> str:
        rc = self.process.wait(timeout=timeout)
        assert rc == 0, f"exit {rc}:\n{self.text()[-4000:]}"
        return self.text()


def run_to_end(args, cwd) -> str:
    return Child(args, cwd).finish()


def kill_at(args, cwd, point: str) -> Child:
    """Run until the audit hook stops the child at `point`, then kill -9 it there."""
    child = Child(args, cwd, pause_at=point)
    assert child.wait_for(child.paused), f"never reached {point}:\n{child.text()[-3000:]}"
    child.kill9()
    return child


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    """Names in `folder` other than `keep` and the test's own logs."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in keep and not p.name.startswith(".child-"))


def assert_only_hidden_leftovers(folder: Path, keep: set[str]) -> None:
    for name in leftovers(folder, keep):
        assert name.startswith(".") and name.endswith(HIDDEN_LEFTOVERS), f"{folder}: stray {name}"


def made_since(path: Path, since_ns: int) -> bool:
    """`path` exists and was made (or last changed) after `since_ns` (time.time_ns())."""
    try:
        return path.stat().st_mtime_ns >= since_ns
    except FileNotFoundError:
        return False


def lines_of(path: Path) -> tuple[list[str], bytes]:
    """Complete lines and the torn tail (bytes after the last newline) of a JSON-lines file."""
    data = path.read_bytes() if path.exists() else b""
    cut = data.rfind(b"\n") + 1
    return data[:cut].decode("utf-8").splitlines(), data[cut:]


# ------------------------------------------------------------------ cultvlm lora

STEPS = 12


def lora_args(tiny_4bit, data, out: Path, save_every: int, *extra) -> list:
    config = out.parent / f"run-save{save_every}.yaml"
    config.write_text(f"save_every: {save_every}\nval_every: 4\nwarmup_steps: 2\n", encoding="utf-8")
    return ["lora", "--config", config, "--model", tiny_4bit, "--data", data, "--out", out,
            "--steps", STEPS, "--batch-size", 4, "--dropout", 0.1, "--seed", 7, "--rank", 8,
            "--learning-rate", "1e-3", "--max-pixels", PIXELS, *extra]


def train_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]


def assert_same_training(out: Path, reference: Path) -> tuple[float, float]:
    """Same loss curve (rtol 1e-6) and adapters (atol 1e-6) as the reference; returns the
    largest relative loss difference and absolute weight difference found."""
    got, want = train_log(out), train_log(reference)
    assert [e["step"] for e in got] == list(range(1, STEPS + 1))
    assert [e["val_loss"] is None for e in got] == [e["val_loss"] is None for e in want]
    losses = np.array([[e["loss"], e["val_loss"] or 0.0] for e in got])
    expected = np.array([[e["loss"], e["val_loss"] or 0.0] for e in want])
    np.testing.assert_allclose(losses, expected, rtol=1e-6)
    a, b = mx.load(str(out / "adapters.safetensors")), mx.load(str(reference / "adapters.safetensors"))
    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        np.testing.assert_allclose(np.array(a[key]), np.array(b[key]), atol=1e-6)
        worst = max(worst, float(np.abs(np.array(a[key]) - np.array(b[key])).max()))
    rel = float(np.max(np.abs(losses - expected) / np.maximum(np.abs(expected), 1e-12)))
    return rel, worst


def check_checkpoint(out: Path, adapter_keys) -> int | None:
    """The checkpoint a resume would read: absent (None) or complete and loadable (its step)."""
    folder = out / "checkpoint"
    assert_only_hidden_leftovers(out, {"checkpoint", "train_log.jsonl", "config.yaml", "adapters.safetensors",
                                       "adapter_config.json", "training_pictures.json", "loss_curve.png"})
    if not folder.exists():
        return None
    assert folder.is_dir()
    assert sorted(p.name for p in folder.iterdir()) == ["adapters.safetensors", "optimizer.safetensors",
                                                       "state.json"]
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    adapters = mx.load(str(folder / "adapters.safetensors"))
    optimizer = mx.load(str(folder / "optimizer.safetensors"))
    assert set(adapters) == set(adapter_keys)
    assert {k.rsplit(".", 1)[0] for k in optimizer if k.endswith((".m", ".v"))} == set(adapter_keys)
    assert all(np.isfinite(np.array(v)).all() for v in adapters.values())
    logged = [e["step"] for e in train_log(out)]
    assert state["step"] in logged, (state["step"], logged)  # logged before it was saved
    return state["step"]


@pytest.fixture(scope="module")
def reference_run(tiny_4bit, dataset, tmp_path_factory) -> Path:
    """An uninterrupted run: the loss curve and adapters every killed run must reproduce."""
    root, _ = dataset
    out = tmp_path_factory.mktemp("lora-reference") / "whole"
    run_to_end(lora_args(tiny_4bit, root, out, 3), out.parent)
    return out


def kill_while_resume_rewrites_the_log(args, out: Path, cwd: Path) -> str:
    """`--resume` drops the log lines after the checkpoint by rewriting train_log.jsonl. Run
    `args` (a resume) under strace, which holds the return of the run's second open() of the
    log (the first reads it; on a plain rewrite the second is the one that truncates it) for
    20 s after the kernel has done it, and kill -9 the run there. Returns that open() call."""
    log = (out / "train_log.jsonl").resolve()
    trace = cwd / f"strace-{time.monotonic_ns()}.txt"
    strace = ["strace", "-f", "--seccomp-bpf", "-qq", "-e", "signal=none", "-o", str(trace), "-P", str(log),
              "-e", "trace=openat", "-e", "inject=openat:delay_exit=20000000:when=2"]
    child = Child(args, cwd, prefix=strace)
    assert child.wait_for(lambda: trace.exists() and "(DELAYED)" in trace.read_text())
    held = next(line for line in trace.read_text().splitlines() if "(DELAYED)" in line)
    os.kill(int(held.split()[0]), signal.SIGKILL)  # the command's process, held inside open()
    time.sleep(0.5)
    child.process.kill()  # strace itself would sit out the rest of the delay
    child.process.wait(timeout=60)
    return held.split(None, 1)[1]


def test_lora_killed_after_five_steps_and_while_resuming_ends_as_the_uninterrupted_run(
        reference_run, tiny_4bit, dataset, tmp_path):
    root, _ = dataset
    out = tmp_path / "cut"
    child = Child(lora_args(tiny_4bit, root, out, 3), tmp_path)
    assert child.wait_for(lambda: (out / "train_log.jsonl").exists()
                          and len(lines_of(out / "train_log.jsonl")[0]) >= 5)
    child.kill9()
    before = lines_of(out / "train_log.jsonl")[0]
    step = check_checkpoint(out, mx.load(str(reference_run / "adapters.safetensors")))
    assert step is not None and step % 3 == 0 and step <= len(before) < STEPS
    assert not (out / "adapters.safetensors").exists()
    print(f"killed after {len(before)} logged steps; checkpoint at step {step}")

    if shutil.which("strace"):  # killed again, while the resume rewrites the log
        held = kill_while_resume_rewrites_the_log(lora_args(tiny_4bit, root, out, 3, "--resume"), out, tmp_path)
        after = lines_of(out / "train_log.jsonl")[0]
        print(f"killed while held in {held}: {len(after)} log lines left")
        assert after[:step] == before[:step], f"the log lost the lines up to the checkpoint: {len(after)} left"
        assert check_checkpoint(out, mx.load(str(reference_run / "adapters.safetensors"))) == step

    text = run_to_end(lora_args(tiny_4bit, root, out, 3, "--resume"), tmp_path)
    assert f"resumed at step {step}" in text
    rel, worst = assert_same_training(out, reference_run)
    print(f"max loss rel diff {rel:.1e}, max adapter diff {worst:.1e}")


# Where a life of the chain below is killed: an audit-hook point, or "sight" (as soon as a
# save has begun: the hidden partial folder is seen) or "random" (a random moment after
# the life's first step), each after a random delay.
CHAIN = [
    "os.mkdir|.checkpoint.partial|2",  # a new save begins; the first checkpoint is in place
    "open|state.json.tmp|1",  # adapters and optimizer written into the partial folder, no state yet
    "sight",
    "os.rename|checkpoint>.checkpoint.old|1",  # the new checkpoint complete, the swap not begun
    "os.rename|.checkpoint.partial>checkpoint|1",  # mid-swap: the old one moved aside, the new not in
    "random",
    "shutil.rmtree|.checkpoint.old|2",  # swapped, the old one being deleted
    "sight",
]
# The last step's checkpoint is saved; the adapters are being written (to a hidden file, renamed).
FINAL = ["os.rename|.adapters.partial.safetensors>adapters.safetensors|1"]


def test_lora_killed_again_and_again_mid_checkpoint_never_loses_a_checkpoint(reference_run, tiny_4bit, dataset,
                                                                             tmp_path):
    """A run saving every step is killed over and over (during saves, mostly) and resumed
    each time: a complete checkpoint is never lost and never half-written, and the result
    equals the uninterrupted run's."""
    root, _ = dataset
    out, rng = tmp_path / "chain", random.Random(1234)
    adapter_keys = mx.load(str(reference_run / "adapters.safetensors"))
    saved, record = None, []  # the last complete checkpoint seen
    for point in CHAIN + FINAL + ["end"]:
        if saved is not None and saved >= STEPS and point not in FINAL + ["end"]:
            continue  # the loop is over; only the final writes are left to hit
        extra = ["--resume"] if saved is not None else (["--force"] if out.exists() else [])
        args = lora_args(tiny_4bit, root, out, 1, *extra)
        finished = False
        if point == "end":
            text, finished = run_to_end(args, tmp_path), True
        elif point in ("sight", "random"):
            child = Child(args, tmp_path)
            if point == "sight":
                # as soon as a new save has begun (not a partial folder left by an earlier kill)
                assert child.wait_for(lambda: made_since(out / ".checkpoint.partial", child.started), poll=0.001)
                time.sleep(rng.uniform(0, 0.004))
            else:
                assert child.wait_for(lambda: "loss=" in child.text())
                time.sleep(rng.uniform(0, 0.7))
            if child.process.poll() is not None:  # it finished in the meantime
                text, finished = child.finish(), True
            else:
                child.kill9()
                text = child.text()
        else:
            text = kill_at(args, tmp_path, point).text()
        resumed = None
        if saved is not None:  # it resumed, from the newest complete checkpoint seen, or a later one
            found = re.search(r"resumed at step (\d+)", text)
            assert found, f"could not resume from the checkpoint of step {saved}:\n{text[-3000:]}"
            resumed = int(found.group(1))
            assert resumed >= saved, f"resumed at step {resumed}: the checkpoint of step {saved} was lost"
        step = check_checkpoint(out, adapter_keys)  # None: absent (a kill mid-swap), else complete
        record.append((point, "finished" if finished else "killed", resumed, step,
                       sorted(p.name for p in out.iterdir() if p.name.startswith("."))))
        saved = step if step is not None else saved
        if point == "end":
            break
    print("\n".join(map(str, record)))
    rel, worst = assert_same_training(out, reference_run)
    assert json.loads((out / "adapter_config.json").read_text())["lora_parameters"]["rank"] == 8
    print(f"{len(record)} lives: max loss rel diff {rel:.1e}, max adapter diff {worst:.1e}")


# ------------------------------------------------------------------ cultvlm data caption

ENTITY_IDS = ["cheburashka", "crocodile_gena", "kolobok", "pikachu"]


def test_caption_killed_mid_run_resumes_without_duplicates(tmp_path):
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    n = 400
    for i in range(n):
        path = images / ENTITY_IDS[i % 4] / f"img_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    captions = tmp_path / "captions.jsonl"

    def args(lang):
        return ["data", "caption", "--provider", "offline", "--images", images, "--catalog", CATALOG,
                "--captions", captions, "--lang", lang]

    kills = []
    for lang, targets in (("ru", (10, 60, 120)), ("en", (30,))):
        for target in targets:
            already = len(lines_of(captions)[0])
            child = Child(args(lang), tmp_path)
            assert child.wait_for(lambda: len(lines_of(captions)[0]) >= already + target, poll=0.001)
            child.kill9()
            complete, torn = lines_of(captions)
            records = [json.loads(line) for line in complete]  # every complete line parses
            keys = [(r["sha256"], r["lang"]) for r in records]
            assert len(keys) == len(set(keys)), "a caption written twice"
            kills.append((lang, len(complete), len(torn)))
            if torn:  # a torn last line is cut away by the next run
                assert not captions.read_bytes().endswith(b"\n")
        had = sum(json.loads(line)["lang"] == lang for line in lines_of(captions)[0])
        text = run_to_end(args(lang), tmp_path)  # captions only what is missing
        assert f"{n - had} new caption(s) in {captions}" in text and f"; {had} image(s) already captioned" in text
    complete, torn = lines_of(captions)
    assert not torn
    records = [json.loads(line) for line in complete]
    keys = [(r["sha256"], r["lang"]) for r in records]
    assert len(keys) == len(set(keys)) == 2 * n
    assert sorted(r["image"] for r in records if r["lang"] == "ru") == sorted(
        f"{p.parent.name}/{p.name}" for p in images.rglob("*.png"))
    print(f"kills (lang, complete lines, torn bytes): {kills}")


# ------------------------------------------------------------------ cultvlm convert, fuse

def check_model_target(target: Path, record: str) -> bool:
    """The output folder is absent, or complete: it loads with stock mlx_vlm.load. Beside it,
    only hidden leftovers. Returns whether it exists."""
    import mlx_vlm

    assert_only_hidden_leftovers(target.parent, {target.name})
    if not target.exists():
        return False
    model, processor = mlx_vlm.load(str(target))
    assert (target / record).is_file() and json.loads((target / record).read_text(encoding="utf-8"))
    del model, processor
    return True


def kill_sequence(args_for, target: Path, record: str, cwd: Path, points: list[str]) -> list:
    """Kill a run at each point in turn (re-running the same command each time, with --force
    where the target exists); returns what was found after each kill. A killed run leaves the
    target as it found it (absent, or the previous complete folder), except when killed
    between the two renames of the swap: then it is absent."""
    found, rng = [], random.Random(7)
    swap = f"os.rename|.{target.name}.partial>{target.name}|1"
    for point in points:
        before = target.exists()
        force = ["--force"] if before else []
        if point == "end":
            run_to_end(args_for(force), cwd)
        elif point == "sight":
            child = Child(args_for(force), cwd)
            partial = target.with_name(f".{target.name}.partial")
            assert child.wait_for(lambda: made_since(partial, child.started), poll=0.001)
            time.sleep(rng.uniform(0, 0.01))
            child.kill9()
        else:
            kill_at(args_for(force), cwd, point)
        exists = check_model_target(target, record)
        if point == "end":
            assert exists
        elif point == swap:
            assert not exists
        elif point != "sight":
            assert exists == before, f"{point}: the target was {'made' if exists else 'removed'} by a killed run"
        found.append((point, "--force" if force else "", "complete" if exists else "absent",
                      leftovers(target.parent, {target.name})))
    # After a successful run nothing hidden is left behind.
    assert leftovers(target.parent, {target.name}) == []
    return found


def test_convert_killed_at_every_stage_never_leaves_a_half_written_model(tiny_hf, tmp_path):
    target = tmp_path / "models" / "q4"

    def args(force):
        return ["convert", "--model", "tiny-4bit", "--hf-path", tiny_hf, "--out", target, *force]

    found = kill_sequence(args, target, "cultvlm_convert.json", tmp_path, [
        "sight",  # mlx-vlm is writing
        "open|cultvlm_convert.json.tmp|1",  # all written but the record
        "os.rename|.q4.partial>q4|1",  # complete, not yet renamed into place
        "end",
        "os.rename|q4>.q4.old|1",  # --force over a complete model: before the swap
        "os.rename|.q4.partial>q4|1",  # mid-swap: the old one moved aside
        "end",
    ])
    print("\n".join(map(str, found)))
    assert [f[1] for f in found[-3:]] == ["--force", "--force", ""]  # the swap points ran over a model


def test_fuse_killed_at_every_stage_never_leaves_a_half_written_model(reference_run, tiny_4bit, tmp_path):
    target = tmp_path / "fused" / "culture"

    def args(force):
        return ["fuse", "--model", tiny_4bit, "--adapter", reference_run, "--out", target, *force]

    found = kill_sequence(args, target, "cultvlm_fuse.json", tmp_path, [
        "sight",  # weights being written into the hidden folder
        "open|cultvlm_fuse.json.tmp|1",  # all written but the record
        "os.rename|.culture.partial>culture|1",  # complete, not yet renamed into place
        "end",
    ])
    first = mx.load(str(target / "model.safetensors"))
    mx.eval(list(first.values()))
    found += kill_sequence(args, target, "cultvlm_fuse.json", tmp_path, [
        "os.rename|.culture.partial>culture|1",  # --force over the fused model: mid-swap
        "end",
    ])
    print("\n".join(map(str, found)))
    assert found[-2][1] == "--force"
    # Every complete result is the same model.
    again = mx.load(str(target / "model.safetensors"))
    assert first.keys() == again.keys() and all(mx.array_equal(first[k], again[k]).item() for k in first)


# ------------------------------------------------------------------ cultvlm eval

def test_eval_killed_mid_run_redoes_nothing_and_matches_an_uninterrupted_run(tiny_4bit, dataset, tmp_path):
    root, _ = dataset

    def args(out):
        return ["eval", "--model", tiny_4bit, "--data", root, "--out", out, "--catalog", CATALOG,
                "--max-tokens", 6, "--max-pixels", 56 * 56, "--batch-size", 8]

    whole = tmp_path / "whole"
    run_to_end(args(whole), tmp_path)
    reference = {p["item_id"]: p for p in map(json.loads, lines_of(whole / "predictions.jsonl")[0])}
    items = len(reference)
    assert len({p["sha256"] for p in reference.values()}) == 16 and items > 100  # every question of 16 pictures

    out, snapshots = tmp_path / "cut", []
    predictions = out / "predictions.jsonl"
    for target in (8, 30):
        child = Child(args(out), tmp_path)
        assert child.wait_for(lambda: len(lines_of(predictions)[0]) >= target, poll=0.002)
        child.kill9()
        complete, torn = lines_of(predictions)
        assert all(json.loads(line)["item_id"] in reference for line in complete)
        snapshots.append((complete, len(torn)))
    # Killed after the last answer, before the run is recorded as finished.
    kill_at(args(out), tmp_path, "open|metrics.json.tmp|1")
    snapshots.append((lines_of(predictions)[0], len(lines_of(predictions)[1])))
    assert len(snapshots[-1][0]) == items
    run_to_end(args(out), tmp_path)

    final, torn = lines_of(predictions)
    assert not torn
    for before, _ in snapshots:  # what was there before each kill is kept as it was
        assert final[:len(before)] == before
    got = [json.loads(line) for line in final]
    assert len(got) == len({p["item_id"] for p in got}) == items  # nothing answered twice
    assert {p["item_id"]: p for p in got} == reference
    assert json.loads((out / "run.json").read_text())["finished_at"]
    assert json.loads((out / "metrics.json").read_text()) == json.loads((whole / "metrics.json").read_text())
    print(f"lines before each kill: {[len(s) for s, _ in snapshots]}; torn bytes: {[t for _, t in snapshots]}")
