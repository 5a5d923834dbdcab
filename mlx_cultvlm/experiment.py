"""`cultvlm experiment SERIES.yaml [--out runs/SERIES]`: train and evaluate a series of variants
from one file, then write one comparison report.

The series file (YAML; paths are relative to the directory cultvlm runs in, like every other
command's):

    name: qwen-3b-vs-7b                 # the default --out is runs/<name> (else the file's stem)
    description: ...                    # optional, printed at the top of the report
    data: datasets/culture              # a `cultvlm data build` folder: train/valid/test.jsonl
    catalog: data/entities.json
    models_dir: null                    # where converted models live (--models-dir wins)
    eval: {split: test, max_pixels: 200704, min_pixels: 3136, max_tokens: 48, batch_size: 20}
    defaults:                           # any `cultvlm lora` option, plus mix, for every variant
      model: 3b-4bit
      rank: 16
      mix: all                          # or a list of meta.kind values to train on
    seeds: [0, 1, 2]                    # every variant is trained once per seed
    baselines:                          # evaluated without training, once (greedy decoding)
      - {name: base-3b, model: 3b-4bit}
      - {name: base-3b-names, model: 3b-4bit, prompt: candidates}
    variants:
      - {name: 3b, note: "...", model: 3b-4bit}
      - {name: 7b, model: 7b-4bit, baseline: base-7b, compare_with: 3b}

A variant takes `defaults`, then its own keys: any LoraConfig field but data/out/models_dir/
seed/distributed, `mix`, `eval` (max_pixels, min_pixels, max_tokens, batch_size: not the split,
so every run answers the same items), `baseline` (the baseline its paired tests and control
retention are measured against; default the first baseline), `compare_with` (the variant it is
tested against seed by seed; default the first variant; null for none) and `note` (free text
for the report). A baseline takes name, model, prompt, eval, baseline, note.

`mix` filters the dataset's train.jsonl on `meta.kind` (naming, fact, describe, verify_yes,
verify_no, replay) into the series' own `data/<kinds>/` folder; valid.jsonl, the evaluated split
and the images are the dataset's own, untouched, so every run is scored on the same items.

`prompt: candidates` (a baseline only) appends the names of every entity in the dataset, in
catalog order, to the naming and fact questions ("Possible answers: ..."): what the base model
does when it only has to pick a name. `prompt: reference_images` shows one training picture of
each of those entities, labelled with its names, before every question's picture
(`evaluate.reference_pictures`, at the eval's pixel budget): what the base model does when it
can compare with a picture of each candidate.

The series folder:

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

import hashlib
import json
import math
import re
import shutil
import statistics
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import click

from .errors import CultvlmError
from .files import partial_folder, replace_folder, write_json
from .images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from .samples import MIX_KINDS
from .settings import Count, checked, settings_class

PROMPTS = ("plain", "candidates", "reference_images")
SERIES_KEYS = ("name", "description", "data", "catalog", "models_dir", "eval", "defaults", "seeds",
               "baselines", "variants")


@settings_class
class EvalSettings:
    """A series' `eval:` (a group's may change all but the split)."""

    split: Literal["train", "valid", "test"] = "test"
    max_pixels: Count = DEFAULT_MAX_PIXELS
    min_pixels: Count = DEFAULT_MIN_PIXELS
    max_tokens: Count = 48
    batch_size: Count = 20


EVAL_DEFAULTS = asdict(EvalSettings())
GROUP_EVAL_KEYS = ("max_pixels", "min_pixels", "max_tokens", "batch_size")
SET_BY_SERIES = ("data", "out", "models_dir", "seed", "distributed")  # LoraConfig fields not in a YAML
NOT_RECORDED = ("val_every", "save_every")  # bookkeeping: a change does not redo a run
VARIANT_KEYS = ("name", "note", "baseline", "compare_with", "eval", "mix")
BASELINE_KEYS = ("name", "note", "model", "prompt", "eval", "baseline")
RESERVED = {"data", "report"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
# Candidate names appended to these question kinds by `prompt: candidates`.
CANDIDATES = {"naming_ru": ("ru", "Варианты ответа: {names}."),
              "naming_en": ("en", "Possible answers: {names}."),
              "fact": ("ru", "Возможные персонажи: {names}.")}
# Figures of the report: key -> (role or None for all entities, metrics group, label).
METRICS = {
    "target_naming": ("target", "naming", "Target naming accuracy (ru+en)"),
    "retention": (None, None, "Control retention vs the baseline"),
    "control_naming": ("control", "naming", "Control naming accuracy (ru+en)"),
    "target_fact": ("target", "fact", "Target fact accuracy"),
    "verify": (None, "verify", "Verification accuracy (yes/no), all entities"),
    "all": (None, "all", "All questions"),
}
UNSET = object()


# --- the series file -----------------------------------------------------------------------

@dataclass
class Group:
    """A baseline (one evaluation) or a variant (one training + evaluation per seed)."""
    name: str
    kind: str  # "baseline" | "variant"
    index: int  # position in its YAML list, for messages
    model: str
    eval: dict
    own: dict  # the keys the YAML sets on this entry, for the report
    note: str = ""
    prompt: str = "plain"
    train: dict | None = None  # LoraConfig options (without data, out, models_dir, seed)
    mix: list[str] | None = None  # None: the whole train.jsonl
    baseline: str | None = None
    compare_with: str | None = None
    runs: list[Run] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.kind}s[{self.index}] ({self.name})"


@dataclass
class Run:
    name: str  # its folder name, unique in the series
    group: Group
    seed: int | None
    folder: Path
    settings: dict = field(default_factory=dict)
    status: str = "new"  # new | resume | finished | changed
    changes: list[str] = field(default_factory=list)


@dataclass
class Series:
    file: Path
    name: str
    description: str
    data: Path
    catalog: Path
    models_dir: str | None
    eval: dict
    seeds: list[int]
    groups: list[Group]

    def group(self, name: str) -> Group:
        return next(g for g in self.groups if g.name == name)


def _one_line(text) -> str:
    return " ".join(str(text).split())


def load_series(path: str | Path) -> Series:
    """Read and check a series file; every error is one line naming the file and the field."""
    import yaml

    from .data.catalog import load_catalog
    from .images import check_budget
    from .lora import LoraConfig, load_config

    path = Path(path)

    def fail(message: str):
        raise CultvlmError(f"{path}: {message}")

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        fail(f"cannot read the series file ({e.strerror or e})")
    except yaml.YAMLError as e:
        fail(f"not valid YAML ({_one_line(e)})")
    if not isinstance(raw, dict):
        fail("expected a mapping of field: value (name, data, defaults, seeds, baselines, variants, ...)")

    def unknown(entry: dict, known, where: str):
        extra = sorted(str(k) for k in entry if k not in known)
        if extra:
            fail(f"{where}unknown field{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))} "
                 f"(known: {', '.join(sorted(known))})")

    unknown(raw, SERIES_KEYS, "")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not NAME.match(name):
        fail(f"name: {name!r} must be letters, digits, '.', '_' or '-' (it names the --out folder)")
    description = raw.get("description") or ""
    if not isinstance(description, str):
        fail("description: expected text")

    if "data" not in raw:
        fail("data: missing (the dataset folder `cultvlm data build` wrote)")
    if not isinstance(raw["data"], str) or not raw["data"]:
        fail(f"data: expected a folder path, got {raw['data']!r}")
    data = Path(raw["data"])
    if not data.is_dir():
        fail(f"data: folder {data} not found (build it with `cultvlm data build --out {data}`)")

    catalog_path = raw.get("catalog", "data/entities.json")
    if not isinstance(catalog_path, str) or not Path(catalog_path).is_file():
        fail(f"catalog: {catalog_path} not found")
    try:
        load_catalog(catalog_path)
    except CultvlmError as e:
        fail(f"catalog: {e.message}")
    models_dir = raw.get("models_dir")
    if models_dir is not None and not isinstance(models_dir, str):
        fail(f"models_dir: expected a folder path, got {models_dir!r}")

    def check_eval(entry, where: str, keys) -> dict:
        if not isinstance(entry, dict):
            fail(f"{where}eval: expected a mapping ({', '.join(keys)})")
        unknown(entry, keys, f"{where}eval: ")
        try:
            values = checked(EvalSettings, entry)
        except CultvlmError as e:
            fail(f"{where}eval.{e.message}")
        return {key: getattr(values, key) for key in entry}

    series_eval = EVAL_DEFAULTS | check_eval(raw.get("eval") or {}, "", tuple(EVAL_DEFAULTS))
    for split in ("train", "valid", series_eval["split"]):
        if not (data / f"{split}.jsonl").is_file():
            fail(f"data: {data / f'{split}.jsonl'} missing (is {data} a `cultvlm data build` folder?)")

    seeds = raw.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                            and s >= 0 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        fail(f"seeds: expected a list of distinct non-negative integers, got {seeds!r}")

    lora_defaults = {f: v for f, v in asdict(LoraConfig()).items() if f not in SET_BY_SERIES}
    train_keys = set(lora_defaults) | {"mix"}

    def check_mix(value, where: str):
        if value == "all":
            return None
        if not isinstance(value, list) or not value:
            fail(f"{where}mix: expected 'all' or a list of kinds ({', '.join(MIX_KINDS)}), got {value!r}")
        for kind in value:
            if kind not in MIX_KINDS:
                fail(f"{where}mix: unknown kind {kind!r} (kinds: {', '.join(MIX_KINDS)})")
        if len(set(value)) != len(value):
            fail(f"{where}mix: a kind is listed twice: {value!r}")
        return [k for k in MIX_KINDS if k in value]

    def check_training(entry: dict, where: str) -> dict:
        options = {k: v for k, v in entry.items() if k != "mix"}
        try:
            values = checked(LoraConfig, options)  # the checks `cultvlm lora` makes, key by key
        except CultvlmError as e:
            fail(f"{where}{e.message}")
        out = {key: getattr(values, key) for key in options}
        if "mix" in entry:
            out["mix"] = check_mix(entry["mix"], where)
        return out

    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        fail("defaults: expected a mapping of option: value")
    unknown(defaults, train_keys, "defaults: ")
    defaults = check_training(defaults, "defaults: ")

    groups: list[Group] = []
    entries = {}
    for kind in ("baselines", "variants"):
        listed = raw.get(kind) or []
        if not isinstance(listed, list) or not all(isinstance(e, dict) for e in listed):
            fail(f"{kind}: expected a list of mappings, each with a name")
        entries[kind] = listed
    if not entries["baselines"] and not entries["variants"]:
        fail("variants: nothing to run (no baselines and no variants)")

    for kind, keys in (("baselines", BASELINE_KEYS), ("variants", VARIANT_KEYS)):
        for i, entry in enumerate(entries[kind]):
            gname = entry.get("name")
            where = f"{kind}[{i}]" + (f" ({gname})" if isinstance(gname, str) else "") + ": "
            unknown(entry, set(keys) | (train_keys if kind == "variants" else set()), where)
            if not isinstance(gname, str) or not NAME.match(gname):
                fail(f"{where}name: {gname!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
            if gname in RESERVED:
                fail(f"{where}name: {gname!r} is reserved for the series' own {gname}/ folder")
            note = entry.get("note") or ""
            if not isinstance(note, str):
                fail(f"{where}note: expected text")
            group_eval = series_eval | check_eval(entry.get("eval") or {}, where, GROUP_EVAL_KEYS)
            try:
                check_budget(group_eval["min_pixels"], group_eval["max_pixels"])
            except CultvlmError as e:
                fail(f"{where}eval: {e.message}")
            own = {k: v for k, v in entry.items() if k not in ("name", "note")}
            if kind == "baselines":
                model = entry.get("model")
                if not isinstance(model, str) or not model:
                    fail(f"{where}model: missing (a preset such as 3b-4bit, or a model folder)")
                prompt = entry.get("prompt", "plain")
                if prompt not in PROMPTS:
                    fail(f"{where}prompt: expected one of {', '.join(PROMPTS)}, got {prompt!r}")
                group = Group(gname, "baseline", i, model, group_eval, own, note, prompt)
            else:
                options = defaults | check_training({k: v for k, v in entry.items() if k in train_keys}, where)
                mix = options.pop("mix", None)
                if "model" not in options:
                    fail(f"{where}model: missing (set it here or in defaults)")
                try:
                    cfg = load_config(None, options | {"data": str(data)})  # the checks `cultvlm lora` makes
                except CultvlmError as e:
                    fail(f"{where}{e.message}")
                resolved = {k: v for k, v in asdict(cfg).items() if k not in SET_BY_SERIES}
                group = Group(gname, "variant", i, cfg.model, group_eval, own, note, train=resolved, mix=mix)
            group.baseline = entry.get("baseline", UNSET)
            group.compare_with = entry.get("compare_with", UNSET) if kind == "variants" else None
            groups.append(group)

    names = [g.name for g in groups]
    for g in groups:
        if names.count(g.name) > 1:
            fail(f"{g.kind}s[{g.index}]: name {g.name!r} is used twice")
    baselines = [g for g in groups if g.kind == "baseline"]
    variants = [g for g in groups if g.kind == "variant"]
    for g in groups:
        where = f"{g.where}: "
        if g.baseline is UNSET:
            g.baseline = baselines[0].name if baselines and baselines[0] is not g else None
        elif g.baseline is not None and g.baseline not in {b.name for b in baselines} - {g.name}:
            fail(f"{where}baseline: {g.baseline!r} is not another baseline of this series")
        if g.kind == "variant":
            if g.compare_with is UNSET:
                g.compare_with = variants[0].name if variants[0] is not g else None
            elif g.compare_with is not None and g.compare_with not in {v.name for v in variants} - {g.name}:
                fail(f"{where}compare_with: {g.compare_with!r} is not another variant of this series")

    return Series(path, name, description, data, Path(catalog_path), models_dir, series_eval, seeds, groups)


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


def mix_folder(series_out: Path, mix: list[str]) -> Path:
    return series_out / "data" / "-".join(mix)


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
    from .data.catalog import load_catalog

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
    from .data.catalog import load_catalog

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
            from .data.catalog import load_catalog
            from .evaluate import reference_pictures

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
    import gc

    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


def execute(series: Series, run: Run, out: Path, models_dir: str | None, progress: bool) -> None:
    from .evaluate import evaluate
    from .lora import load_config, train

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
    from .evaluate import let_cpu_streams_overlap

    let_cpu_streams_overlap()  # before a run trains: the setting is read at the first evaluation
    for number, run in enumerate(todo, 1):
        what = "evaluate" if run.group.kind == "baseline" else f"train {run.group.train['steps']} steps + evaluate"
        click.echo(f"[{number}/{len(todo)}] {run.name}: {what}" + (" (resuming)" if run.status == "resume" else ""))
        execute(series, run, out, models_dir, progress)
    folder = write_report(series, runs, out / "report")
    click.echo(f"report written to {folder / 'report.md'} and {folder / 'report.html'}")
    return folder


# --- statistics ----------------------------------------------------------------------------

def t_quantile(df: int, level: float = 0.95) -> float:
    from scipy.stats import t

    return float(t.ppf(1 - (1 - level) / 2, df))


def summarize(figures: list[dict]) -> dict:
    """Across the runs (seeds) of a group: the mean of the per-run values with a Student-t
    interval (two or more values), and the pooled figure (all answers together) with its
    Wilson interval."""
    from .metrics import figure

    values = [f["value"] for f in figures if f["n"]]
    m = len(values)
    mean = sum(values) / m if m else None
    half = ci = None
    if m >= 2:
        half = t_quantile(m - 1) * statistics.stdev(values) / math.sqrt(m)
        ci = [max(0.0, mean - half), min(1.0, mean + half)]
    pooled = figure(sum(f["k"] for f in figures), sum(f["n"] for f in figures))
    return {"runs": len(figures), "values": values, "mean": mean, "t_half_width": half, "t_ci95": ci,
            "pooled": pooled}


def difference(a: list[dict], b: list[dict]) -> dict:
    """Seed-matched difference of values (a - b): its mean and Student-t interval."""
    diffs = [x["value"] - y["value"] for x, y in zip(a, b) if x["n"] and y["n"]]
    m = len(diffs)
    mean = sum(diffs) / m if m else None
    half = t_quantile(m - 1) * statistics.stdev(diffs) / math.sqrt(m) if m >= 2 else None
    return {"differences": diffs, "mean": mean, "t_half_width": half,
            "t_ci95": [mean - half, mean + half] if half is not None else None}


def role_figure(metrics: dict, role: str | None, group: str) -> dict:
    """A run's accuracy over the pictures of one role, from its metrics.json; over all catalog
    entities, the overall figure."""
    return metrics["roles"][role][group] if role else metrics["overall"][group]


def _only(items: dict, role: str) -> list[dict]:
    return [r for r in items.values() if r["role"] == role]


def paired_tests(reference: dict, run: dict) -> dict:
    """`run` against `reference` on their shared items (metrics.paired): naming on targets and
    on controls (sign tests on pictures), all questions, and control retention."""
    from .metrics import paired

    both = paired(list(reference["items"].values()), list(run["items"].values()))
    return {"reference": reference["name"], "run": run["name"], "shared": both["shared"],
            "retention": both["retention"], "all": both["tests"]["all"],
            "target_naming": paired(_only(reference["items"], "target"), _only(run["items"], "target"))["tests"]["naming"],
            "control_naming": paired(_only(reference["items"], "control"), _only(run["items"], "control"))["tests"]["naming"]}


# --- the report ----------------------------------------------------------------------------

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
    from .report import fig_text

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
    from matplotlib.figure import Figure

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
    from .report import change, compare, count_text, fig_text, load_run, p_text, to_html, to_markdown

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
    from .report import change

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


@click.command("experiment")
@click.argument("series_file", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="series folder [default: runs/<name>]")
@click.option("--models-dir", type=click.Path(file_okay=False), help="where converted models live")
@click.option("--force", is_flag=True, help="redo runs recorded with other settings (otherwise refused)")
@click.option("--dry-run", is_flag=True, help="check the file and list each run's status; run nothing")
def command(series_file, out, models_dir, force, dry_run):
    """Train and evaluate every variant of SERIES_FILE (YAML) over its seeds; one comparison report."""
    run_series(series_file, out, force=force, models_dir=models_dir, dry_run=dry_run)
