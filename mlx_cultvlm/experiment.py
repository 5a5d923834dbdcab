"""`cultvlm experiment SERIES.yaml [--out runs/SERIES]`: train and evaluate a series of variants
from one file, then write one comparison report.

The series file's format: series.py. The series folder:

    <out>/data/<kinds>/              train.jsonl filtered by the mix; links to the dataset's images
    <out>/<variant>-s<seed>/         one run: experiment.json (its settings), adapters/, and the
                                     evaluation (run.json, predictions.jsonl, metrics.json)
    <out>/<baseline>/                a baseline's evaluation and experiment.json
    <out>/report/                    report.md, report.html, the figures, metrics.json, and
                                     details/ (`cultvlm compare` of the baselines and each
                                     variant's first seed: per-entity tables, confusions, losses)

A run is finished when its metrics.json exists and the settings recorded in its
experiment.json equal the current ones: a re-run skips it. An unfinished run resumes (training
from its checkpoint, evaluation from its predictions). A run whose recorded settings differ
(the YAML, the data or the catalog changed) is refused before anything starts, naming the
changed fields; --force deletes and redoes such runs.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import click
import mlx.core as mx

from .data.catalog import load_catalog
from .errors import CultvlmError
from .evaluate import evaluate, let_cpu_streams_overlap, reference_pictures
from .files import write_json
from .lora import load_config, train
from .series import CANDIDATES, Group, Run, Series, load_series, mix_folder
from .series_report import write_report





NOT_RECORDED = ("val_every", "save_every")  # bookkeeping: a change does not redo a run


# --- the series file -----------------------------------------------------------------------











# --- planning: run folders, their settings, what is finished -------------------------------

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def filter_train(series: Series, group: Group) -> tuple[bytes, dict[str, int]]:
    """The lines of the dataset's train.jsonl whose meta.kind is in the variant's mix, verbatim;
    and how many lines of each kind the file has."""
    source = series.data / "train.jsonl"
    kept, kinds = [], {}
    for number, line in enumerate(source.read_bytes().splitlines(keepends=True), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kind = (record.get("meta") or {}).get("kind")
        except (ValueError, AttributeError):
            raise CultvlmError(f"{source}:{number}: not a JSON object with meta") from None
        if not isinstance(kind, str):
            raise CultvlmError(f"{source}:{number}: no meta.kind, so `mix` of {series.file} "
                               f"{group.where} cannot select it (use mix: all)")
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind in group.mix:
            kept.append(line if line.endswith(b"\n") else line + b"\n")
    if not kept:
        there = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        raise CultvlmError(f"{series.file}: {group.where}: mix: {', '.join(group.mix)} selects none of the "
                           f"lines of {source} (kinds there: {there})")
    return b"".join(kept), kinds


def write_mix_folder(series: Series, folder: Path, content: bytes) -> None:
    """train.jsonl (filtered), valid.jsonl (the dataset's, as it is) and links to everything
    else of the dataset folder (images/), so image paths resolve as in the dataset."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (("train.jsonl", content), ("valid.jsonl", (series.data / "valid.jsonl").read_bytes())):
        target = folder / name
        if not target.is_file() or target.read_bytes() != data:
            tmp = folder / f".{name}.tmp"
            tmp.write_bytes(data)
            tmp.replace(target)
    for entry in series.data.iterdir():
        if entry.suffix == ".jsonl" or entry.name.startswith("."):
            continue
        link = folder / entry.name
        wanted = entry.resolve()
        if link.is_symlink() and link.resolve() == wanted:
            continue
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.exists():
            shutil.rmtree(link)
        link.symlink_to(wanted, target_is_directory=entry.is_dir())


def dataset_entities(series: Series) -> list[str]:
    """Every entity of the dataset's train, valid and evaluated split, in catalog order."""
    catalog = load_catalog(series.catalog)
    seen = set()
    for split in dict.fromkeys(("train", "valid", series.eval["split"])):
        for line in (series.data / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    seen.add((json.loads(line).get("meta") or {}).get("entity"))
                except (ValueError, AttributeError):
                    continue  # evaluate names the bad line
    return [e for e in catalog if e in seen]


def candidate_suffix(series: Series) -> dict[str, str]:
    catalog = load_catalog(series.catalog)
    entities = dataset_entities(series)
    return {kind: text.format(names="; ".join(catalog[e].name(lang) for e in entities))
            for kind, (lang, text) in CANDIDATES.items()}


def plan(series: Series, out: Path) -> tuple[list[Run], dict[str, bytes]]:
    """Every run with its settings and status; the filtered train files by mix folder."""
    file_sha = {}

    def sha_of(path: Path) -> str:
        if path not in file_sha:
            file_sha[path] = _sha256(path.read_bytes())
        return file_sha[path]

    catalog_sha = sha_of(series.catalog)
    test_sha = sha_of(series.data / f"{series.eval['split']}.jsonl")
    suffix = None
    mixes: dict[str, bytes] = {}
    runs: list[Run] = []
    for group in series.groups:
        group.runs = []
        evaluation = {k: group.eval[k] for k in ("split", "max_pixels", "min_pixels", "max_tokens")}
        if group.prompt == "candidates":
            suffix = suffix or candidate_suffix(series)
            evaluation["prompt_suffix"] = suffix
        if group.prompt == "reference_images":
            evaluation["references"] = reference_pictures(series.data, load_catalog(series.catalog))
        common = {"kind": group.kind, "model": group.model, "eval": evaluation,
                  "eval_data_sha256": test_sha, "catalog_sha256": catalog_sha}
        if group.kind == "baseline":
            group.runs.append(Run(group.name, group, None, out / group.name, common))
            continue
        if group.mix is None:
            train_sha = sha_of(series.data / "train.jsonl")
        else:
            key = str(mix_folder(out, group.mix))
            if key not in mixes:
                mixes[key], _ = filter_train(series, group)
            train_sha = _sha256(mixes[key])
        training = {k: v for k, v in group.train.items() if k not in NOT_RECORDED}
        for seed in series.seeds:
            settings = common | {"seed": seed, "train": training, "mix": group.mix or "all",
                                 "train_data_sha256": train_sha,
                                 "valid_data_sha256": sha_of(series.data / "valid.jsonl")}
            group.runs.append(Run(f"{group.name}-s{seed}", group, seed, out / f"{group.name}-s{seed}", settings))
    # Seed-major: after the first seed of every variant the series can already be read.
    runs = [r for g in series.groups if g.kind == "baseline" for r in g.runs]
    runs += [r for seed in series.seeds for g in series.groups if g.kind == "variant"
             for r in g.runs if r.seed == seed]
    folders = [r.name for r in runs]
    for r in runs:
        if folders.count(r.name) > 1:
            raise CultvlmError(f"{series.file}: {r.group.where}: its run folder {r.name} is also another "
                               "run's; rename one of them")
        r.status, r.changes = _status(r)
    return runs, mixes


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "prompt_suffix":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _status(run: Run) -> tuple[str, list[str]]:
    if not run.folder.exists():
        return "new", []
    record = run.folder / "experiment.json"
    try:
        previous = json.loads(record.read_text(encoding="utf-8"))["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return "changed", [f"{record.name} missing or unreadable: not a run of `cultvlm experiment`"]
    old, new = _flatten(previous), _flatten(run.settings)
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            if key.endswith("sha256"):
                changes.append(f"{key.removesuffix('_sha256').replace('_', ' ')} changed")
            else:
                changes.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    if changes:
        return "changed", changes
    return ("finished" if finished(run.folder) else "resume"), []


def finished(folder: Path) -> bool:
    try:
        info = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (folder / "metrics.json").is_file() and bool(info.get("finished_at"))


# --- running -------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _release_memory() -> None:
    gc.collect()
    mx.clear_cache()


def execute(series: Series, run: Run, out: Path, models_dir: str | None, progress: bool) -> None:
    group = run.group
    if run.status == "changed" and run.folder.exists():
        shutil.rmtree(run.folder)
    run.folder.mkdir(parents=True, exist_ok=True)
    record = run.folder / "experiment.json"
    started = _now()
    if record.is_file() and run.status == "resume":
        started = json.loads(record.read_text(encoding="utf-8")).get("started_at") or started
    info = {"series": str(series.file), "run": run.name, "group": group.name, "settings": run.settings,
            "started_at": started, "finished_at": None}
    write_json(record, info)

    adapter = None
    if group.kind == "variant":
        adapter = run.folder / "adapters"
        data = mix_folder(out, group.mix) if group.mix else series.data
        cfg = load_config(None, group.train | {"data": str(data), "out": str(adapter), "seed": run.seed,
                                               "models_dir": models_dir})
        if not ((adapter / "adapters.safetensors").is_file() and (adapter / "adapter_config.json").is_file()):
            resume = (adapter / "checkpoint" / "state.json").is_file()
            train(cfg, resume=resume, force=not resume, progress=progress)  # its model is dropped here
            _release_memory()
    evaluate(group.model, run.folder, data=str(series.data), split=group.eval["split"],
             adapter=str(adapter) if adapter else None, catalog_path=str(series.catalog),
             batch_size=group.eval["batch_size"], max_tokens=group.eval["max_tokens"],
             min_pixels=group.eval["min_pixels"], max_pixels=group.eval["max_pixels"],
             models_root=models_dir, progress=progress,
             prompt_suffix=run.settings["eval"].get("prompt_suffix"), references=run.settings["eval"].get("references"))
    _release_memory()
    write_json(record, info | {"finished_at": _now()})


def run_series(series_file: str | Path, out: str | Path | None = None, force: bool = False,
               models_dir: str | None = None, progress: bool = True, dry_run: bool = False) -> Path | None:
    """Check the series file, run what is not finished, write the report; returns its folder."""
    series = load_series(series_file)
    out = Path(out) if out else Path("runs") / series.name
    models_dir = models_dir or series.models_dir
    runs, mixes = plan(series, out)
    changed = [r for r in runs if r.status == "changed"]
    if dry_run:
        click.echo(f"{series.name}: {len(runs)} runs in {out}")
        for r in runs:
            click.echo(f"  {r.name}: {r.status}" + (f" ({'; '.join(r.changes[:3])})" if r.changes else ""))
        return None
    if changed and not force:
        first = changed[0]
        more = f" (and {len(changed) - 1} more run{'s' if len(changed) > 2 else ''} changed)" if len(changed) > 1 else ""
        shown = "; ".join(first.changes[:3]) + (f"; +{len(first.changes) - 3} more" if len(first.changes) > 3 else "")
        raise CultvlmError(f"{first.folder}: was run with other settings ({shown}){more}; run with --force "
                           f"to redo changed runs, use another --out, or restore {series.file}")
    todo = [r for r in runs if r.status != "finished"]
    click.echo(f"{series.name}: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to do"
               + (f" ({sum(r.status == 'changed' for r in todo)} redone with other settings)" if changed else ""))
    for folder, content in mixes.items():
        write_mix_folder(series, Path(folder), content)
    let_cpu_streams_overlap()  # before a run trains: the setting is read at the first evaluation
    for number, run in enumerate(todo, 1):
        what = "evaluate" if run.group.kind == "baseline" else f"train {run.group.train['steps']} steps + evaluate"
        click.echo(f"[{number}/{len(todo)}] {run.name}: {what}" + (" (resuming)" if run.status == "resume" else ""))
        execute(series, run, out, models_dir, progress)
    folder = write_report(series, runs, out / "report")
    click.echo(f"report written to {folder / 'report.md'} and {folder / 'report.html'}")
    return folder


# --- statistics ----------------------------------------------------------------------------













# --- the report ----------------------------------------------------------------------------

















@click.command("experiment")
@click.argument("series_file", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="series folder [default: runs/<name>]")
@click.option("--models-dir", type=click.Path(file_okay=False), help="where converted models live")
@click.option("--force", is_flag=True, help="redo runs recorded with other settings (otherwise refused)")
@click.option("--dry-run", is_flag=True, help="check the file and list each run's status; run nothing")
def command(series_file, out, models_dir, force, dry_run):
    """Train and evaluate every variant of SERIES_FILE (YAML) over its seeds; one comparison report."""
    run_series(series_file, out, force=force, models_dir=models_dir, dry_run=dry_run)
