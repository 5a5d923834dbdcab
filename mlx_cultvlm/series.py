"""A series file: its format, and its validation (every error one line naming the file and the
field) before anything runs. `cultvlm experiment` (experiment.py) runs what it describes.

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
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from .data.catalog import load_catalog
from .errors import CultvlmError
from .images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, check_budget
from .lora import LoraConfig, load_config
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


VARIANT_KEYS = ("name", "note", "baseline", "compare_with", "eval", "mix")


BASELINE_KEYS = ("name", "note", "model", "prompt", "eval", "baseline")


RESERVED = {"data", "report"}


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


# Candidate names appended to these question kinds by `prompt: candidates`.
CANDIDATES = {"naming_ru": ("ru", "Варианты ответа: {names}."),
              "naming_en": ("en", "Possible answers: {names}."),
              "fact": ("ru", "Возможные персонажи: {names}.")}


UNSET = object()


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


def mix_folder(series_out: Path, mix: list[str]) -> Path:
    """Where a series keeps train.jsonl filtered by a mix."""
    return series_out / "data" / "-".join(mix)
