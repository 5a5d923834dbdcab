"""`cultvlm data add ID`: put a folder of pictures under `<images-root>/<ID>/` and the entity into
the catalog.

Only files Pillow decodes completely are copied. Nothing already there is lost: a file that is
already present (same sha256, under any name) is skipped, and a different file with a taken name
gets a new name (`name-2.jpg`). An existing entry keeps its facts, names and role; new names are
appended as aliases. A `sources.jsonl` in the source folder ({file, source_url, author, license}
per line) follows the copied files, renamed ones included.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from ..errors import CultvlmError
from ..files import NOT_UTF8, printable, utf8_name
from .catalog import LANGS, ROLES, Entity, _entity, check_names_unshared, load_catalog, save_catalog
from .check import SIDECAR_FILES, decode_strictly, sha256_of

DEFAULT_CATALOG = "data/entities.json"
DEFAULT_IMAGES_ROOT = "data/images"


@dataclass
class AddReport:
    entity: Entity
    created: bool  # a new catalog entry
    copied: list[tuple[Path, str]] = field(default_factory=list)  # (source, name in the entity folder)
    already_there: list[Path] = field(default_factory=list)
    rejected: list[tuple[Path, str]] = field(default_factory=list)  # (source, why)


def free_name(folder: Path, name: str) -> str:
    """`name`, or `stem-2.ext`, `stem-3.ext`, ... whichever is not taken in `folder`."""
    stem, suffix = os.path.splitext(name)
    candidate, n = name, 1
    while (folder / candidate).exists():
        n += 1
        candidate = f"{stem}-{n}{suffix}"
    return candidate


def updated_entity(existing: Entity | None, entity_id: str, names: dict[str, list[str]], role: str | None,
                   where: str) -> Entity:
    """The catalog entry after `add`: existing facts, names and role kept, new names appended."""
    if existing is None:
        if not any(names.values()):
            raise CultvlmError(f"{where}: {entity_id!r} is a new entity: give it a name with --name and/or --name-en")
        raw = {"id": entity_id, "names": names, "role": role or "target"}
    else:
        raw = {k: v for k, v in asdict(existing).items() if v is not None}
        for lang, extra in names.items():
            known = raw["names"].setdefault(lang, [])
            known.extend(n for n in extra if n not in known)
        if role:
            raw["role"] = role
    return _entity(raw, where)  # the catalog's own checks (id, names, role)


def source_records(folder: Path) -> dict[str, dict]:
    """{file: line} from the source folder's sources.jsonl; unreadable lines are skipped with a
    warning (they only carry attribution)."""
    path = folder / "sources.jsonl"
    if not path.is_file():
        return {}
    records = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[str(record["file"])] = record
        except (json.JSONDecodeError, KeyError, TypeError):
            click.echo(f"warning: {path}:{lineno}: not a JSON object with a 'file', ignored", err=True)
    return records


def copy_images(source: Path, dest: Path, report: AddReport) -> None:
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.name not in SIDECAR_FILES
                   and not any(part.startswith(".") for part in p.relative_to(source).parts))
    # Identity is the content: a picture already in the folder under any name is not copied again.
    present = {sha256_of(p) for p in (dest.iterdir() if dest.is_dir() else [])
               if p.is_file() and p.name not in SIDECAR_FILES}
    for path in files:
        if not utf8_name(path.relative_to(source)):
            report.rejected.append((path, NOT_UTF8))
            continue
        try:
            decode_strictly(path)
        except CultvlmError as e:
            report.rejected.append((path, e.message.removeprefix(f"{path}: ")))
            continue
        digest = sha256_of(path)
        if digest in present:
            report.already_there.append(path)
            continue
        dest.mkdir(parents=True, exist_ok=True)
        name = free_name(dest, path.name)
        partial = dest / f".{name}.partial"  # hidden until complete: a crash leaves no half image
        shutil.copy2(path, partial)
        os.replace(partial, dest / name)
        present.add(digest)
        report.copied.append((path, name))
    sources = source_records(source)
    attributed = [{**sources[src.relative_to(source).as_posix()], "file": name}
                  for src, name in report.copied if src.relative_to(source).as_posix() in sources]
    if attributed:
        with (dest / "sources.jsonl").open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in attributed)


def add_entity(entity_id: str, names: dict[str, list[str]], source: str | Path | None = None,
               role: str | None = None, catalog_path: str | Path = DEFAULT_CATALOG,
               images_root: str | Path = DEFAULT_IMAGES_ROOT) -> AddReport:
    catalog_path, images_root = Path(catalog_path), Path(images_root)
    # A missing catalog starts a new one; a broken one is an error before anything is copied.
    entities = load_catalog(catalog_path) if catalog_path.exists() else {}
    existing = entities.get(entity_id)
    entity = updated_entity(existing, entity_id, {k: list(v) for k, v in names.items() if v}, role,
                            f"{catalog_path}: entity {entity_id!r}")
    check_names_unshared([*(e for e in entities.values() if e.id != entity_id), entity], str(catalog_path))
    report = AddReport(entity, created=existing is None)
    if source is not None:
        source = Path(source)
        if not source.is_dir():
            raise CultvlmError(f"{source}: no such folder of images")
        copy_images(source, images_root / entity_id, report)
    entities[entity_id] = entity
    catalog_path.parent.mkdir(parents=True, exist_ok=True)
    save_catalog(catalog_path, entities)
    return report


def next_steps(catalog_path: str, images_root: str) -> list[str]:
    flags = ""
    if images_root != DEFAULT_IMAGES_ROOT:
        flags += f" --images {images_root}"
    if catalog_path != DEFAULT_CATALOG:
        flags += f" --catalog {catalog_path}"
    from .caption import environment

    # Without credentials the default provider (GigaChat) would only stop with an error.
    caption = ("cultvlm data caption" if environment().get("GIGACHAT_CREDENTIALS")
               else "cultvlm data caption --provider offline")
    return [f"cultvlm data check{flags}          # decode everything, find duplicates",
            f"{caption}{flags}        # optional: describe each picture",
            f"cultvlm data build --out datasets/culture{flags}"]


@click.command("add")
@click.argument("entity_id", metavar="ID")
@click.option("--name", "names_ru", multiple=True,
              help="Russian name; for a new entity the first is canonical, the rest aliases (repeatable)")
@click.option("--name-en", "names_en", multiple=True, help="English name (repeatable)")
@click.option("--images", "source", type=click.Path(file_okay=False),
              help="folder of pictures to copy in (only files Pillow can decode)")
@click.option("--role", type=click.Choice(ROLES), default=None,
              help="target: to learn; control: already known [default: target, or unchanged]")
@click.option("--catalog", "catalog_path", default=DEFAULT_CATALOG, show_default=True,
              type=click.Path(dir_okay=False))
@click.option("--images-root", default=DEFAULT_IMAGES_ROOT, show_default=True, type=click.Path(file_okay=False))
def command(entity_id, names_ru, names_en, source, role, catalog_path, images_root):
    """Copy a folder of pictures of entity ID into the images folder and add ID to the catalog."""
    report = add_entity(entity_id, dict(zip(LANGS, (list(names_ru), list(names_en)))), source, role,
                        catalog_path, images_root)
    dest = Path(images_root) / entity_id
    if source is not None:
        renamed = sum(src.name != name for src, name in report.copied)
        click.echo(f"{entity_id}: copied {len(report.copied)} image(s) to {dest}"
                   + (f" ({renamed} renamed: the name was taken)" if renamed else "")
                   + f", {len(report.already_there)} already there")
        if report.rejected:
            click.echo(f"skipped {len(report.rejected)} file(s) that are not readable images:")
            for path, why in report.rejected:
                click.echo(f"  {printable(path)}: {why}")
    entity = report.entity
    click.echo(f"{catalog_path}: {'added' if report.created else 'updated'} {entity_id} "
               f"({entity.role}; {' / '.join(entity.all_names())})")
    click.echo("next:")
    for line in next_steps(catalog_path, images_root):
        click.echo(f"  {line}")
