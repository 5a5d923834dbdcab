"""The entity catalog (`data/entities.json`): who the model should learn, and who it knows.

    {"entities": [
      {"id": "cheburashka",
       "names": {"ru": ["Чебурашка"], "en": ["Cheburashka"]},      # first = canonical
       "facts": {"ru": ["..."], "en": ["..."]},
       "origin": {"work": "...", "author": "...", "year": 1966},    # + work_en, author_en
       "role": "target",                                             # or "control"
       "confusable_with": ["mickey_mouse"],
       "commons_category": "Cheburashka"}                            # optional
    ]}

`origin` says where the entity comes from; the fact question is graded on its work or author
(`work_en` / `author_en`: their English forms, where transliteration does not give them, as
"East Slavic folk tale" for «восточнославянская народная сказка»).

The seed project's plain map `{"gena": "Крокодил Гена"}` is accepted too and upgraded (one
Russian name, role target, no facts) -- `save_catalog` then writes the full form.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from ..errors import CultvlmError

ROLES = ("target", "control")
LANGS = ("ru", "en")
ORIGIN_KEYS = ("work", "author", "work_en", "author_en")  # what states an entity's origin


@dataclass
class Entity:
    id: str
    names: dict[str, list[str]]
    facts: dict[str, list[str]] = field(default_factory=lambda: {"ru": [], "en": []})
    origin: dict = field(default_factory=dict)
    role: str = "target"
    confusable_with: list[str] = field(default_factory=list)
    commons_category: str | None = None

    def name(self, lang: str = "ru") -> str:
        """The canonical name in `lang`, falling back to the other language."""
        for code in (lang, *LANGS):
            if self.names.get(code):
                return self.names[code][0]
        raise CultvlmError(f"entity {self.id!r} has no name")

    def all_names(self) -> list[str]:
        return [n for code in LANGS for n in self.names.get(code, [])]


def folder_id(name: str) -> str:
    """The entity id an image folder's name stands for: ids are NFC, and a folder written on
    macOS or unpacked from its zip may spell the same name in NFD."""
    return unicodedata.normalize("NFC", name)


def disk_key(entity_id: str) -> str:
    """What a case-insensitive, normalising file system compares: two ids with one key collide."""
    return unicodedata.normalize("NFC", entity_id).casefold()


def _reject_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"duplicate key(s) {', '.join(dupes)}")
    return dict(pairs)


def _entity(raw: dict, where: str) -> Entity:
    if not isinstance(raw, dict):
        raise CultvlmError(f"{where}: each entity must be a JSON object")
    known = {"id", "names", "facts", "origin", "role", "confusable_with", "commons_category"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CultvlmError(f"{where}: unknown field(s) {', '.join(unknown)}")
    entity_id = raw.get("id")
    # The id names the image folder: it must not be able to point outside data/images.
    if (not isinstance(entity_id, str) or not entity_id or entity_id != entity_id.strip()
            or entity_id.startswith(".") or "/" in entity_id or "\\" in entity_id):
        raise CultvlmError(f"{where}: 'id' must be a non-empty string without '/', '\\' or a leading '.'")
    where = f"{where} ({entity_id})"
    names = raw.get("names")
    if not isinstance(names, dict) or not any(names.get(code) for code in LANGS):
        raise CultvlmError(f"{where}: 'names' needs at least one name in ru or en")
    for field_name in ("names", "facts"):
        value = raw.get(field_name, {})
        if not isinstance(value, dict) or not all(
                isinstance(v, list) and all(isinstance(s, str) and s.strip() for s in v) for v in value.values()):
            raise CultvlmError(f"{where}: '{field_name}' must map ru/en to lists of strings")
    role = raw.get("role", "target")
    if role not in ROLES:
        raise CultvlmError(f"{where}: role must be target or control, got {role!r}")
    confusable = raw.get("confusable_with", [])
    if not isinstance(confusable, list) or not all(isinstance(c, str) for c in confusable):
        raise CultvlmError(f"{where}: 'confusable_with' must be a list of entity ids")
    if entity_id in confusable:
        raise CultvlmError(f"{where}: 'confusable_with' lists the entity itself")
    if not isinstance(raw.get("origin") or {}, dict):
        raise CultvlmError(f"{where}: 'origin' must be an object like "
                           f"{{\"work\": ..., \"author\": ..., \"year\": ...}}")
    if not isinstance(raw.get("commons_category"), (str, type(None))):
        raise CultvlmError(f"{where}: 'commons_category' must be a string")
    return Entity(entity_id, {k: list(v) for k, v in names.items()},
                  {**{code: [] for code in LANGS}, **{k: list(v) for k, v in raw.get("facts", {}).items()}},
                  dict(raw.get("origin") or {}), role, list(confusable), raw.get("commons_category"))


_CYR_TO_LAT = dict(zip("абвгдеёжзийклмнопрстуфхцчшщъыьэюя", [
    "a", "b", "v", "g", "d", "e", "e", "zh", "z", "i", "y", "k", "l", "m", "n", "o", "p", "r", "s", "t",
    "u", "f", "kh", "ts", "ch", "sh", "shch", "", "y", "", "e", "yu", "ya"]))
# Romanisations differ (Tchebourachka, Alyosha/Aliosha, Uspensky/Uspenskiy): fold the common ones.
_LATIN_FOLDS = [("š", "sh"), ("č", "ch"), ("ž", "zh"), ("x", "ks"), ("tch", "ch"), ("ou", "u"),
                ("yo", "e"), ("io", "e"), ("ye", "e"), ("ey", "ei")]


@lru_cache(maxsize=100_000)
def spelling_key(word: str) -> str:
    """One Latin spelling for a lower-case word of either script (ё = е, Cyrillic transliterated)."""
    text = "".join(_CYR_TO_LAT.get(ch, ch) for ch in word)
    for a, b in _LATIN_FOLDS[:3]:
        text = text.replace(a, b)
    text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    for a, b in _LATIN_FOLDS[3:]:
        text = text.replace(a, b)
    return re.sub(r"(iy|yy|ii)$", "y", text)  # -ий/-ый endings: Uspensky = Успенский


def same_name_key(name: str) -> str:
    """A name as a reader (and the grader) hears it: case, script, ё/е, hyphens and spacing do not
    tell names apart («Гена» = "Gena")."""
    return " ".join(spelling_key(w) for w in re.findall(r"[^\W\d_]+", unicodedata.normalize("NFC", name).casefold()))


def check_names_unshared(entities, where: str) -> None:
    """No name belongs to two entities: an answer that says it could mean either, and the grader
    could not tell them apart (the seed's map had both `gena` and `crocodile_gena` «Крокодил Гена»)."""
    owner: dict[str, str] = {}
    for entity in entities:
        for name in entity.all_names():
            other = owner.setdefault(same_name_key(name), entity.id)
            if other != entity.id:
                raise CultvlmError(f"{where}: entities {other!r} and {entity.id!r} share the name {name!r}; if "
                                   f"they are one character, keep one entry and move the other's images into its folder")


def load_catalog(path: str | Path) -> dict[str, Entity]:
    """Entities by id, checked: unique ids, names no two entities share, known `confusable_with`,
    valid fields."""
    path = Path(path)
    if not path.is_file():
        raise CultvlmError(f"{path}: catalog missing")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CultvlmError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        raw = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as e:
        raise CultvlmError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    except ValueError as e:  # duplicate keys
        raise CultvlmError(f"{path}: {e}") from None
    if isinstance(raw, dict) and "entities" not in raw and all(isinstance(v, str) for v in raw.values()):
        # The seed's plain {"folder": "Display name"} map.
        entities = [_entity({"id": k, "names": {"ru": [v], "en": []}}, f"{path}: entry {k!r}")
                    for k, v in raw.items()]
    elif isinstance(raw, dict) and isinstance(raw.get("entities"), list):
        entities = [_entity(e, f"{path}: entity #{i + 1}") for i, e in enumerate(raw["entities"])]
    else:
        raise CultvlmError(f"{path}: expected {{\"entities\": [...]}} or a {{\"id\": \"name\"}} map")
    by_id: dict[str, Entity] = {}
    for entity in entities:
        if entity.id in by_id:
            raise CultvlmError(f"{path}: duplicate entity id {entity.id!r}")
        # The id names a folder: on macOS (case-insensitive, and NFD in file names) "Gena" and
        # "gena", or two spellings of "Алёша", are the same folder.
        same = next((other for other in by_id if disk_key(other) == disk_key(entity.id)), None)
        if same is not None:
            raise CultvlmError(f"{path}: entity ids {same!r} and {entity.id!r} differ only in case or Unicode "
                               "form, and would share one image folder on macOS; rename one")
        by_id[entity.id] = entity
    # Ids are NFC from here on, as folder_id reads the image folders.
    entities = [replace(e, id=folder_id(e.id), confusable_with=[folder_id(c) for c in e.confusable_with])
                for e in entities]
    by_id = {e.id: e for e in entities}
    check_names_unshared(entities, str(path))
    for entity in entities:
        unknown = [c for c in entity.confusable_with if c not in by_id]
        if unknown:
            raise CultvlmError(f"{path}: {entity.id}: confusable_with names unknown id(s) {', '.join(unknown)}")
    return by_id


def save_catalog(path: str | Path, entities: dict[str, Entity]) -> None:
    """Write the full form (atomically), entities in their order."""
    from ..files import write_json

    write_json(Path(path), {"entities": [
        {k: v for k, v in asdict(e).items() if v is not None} for e in entities.values()]})
