"""Writing outputs so that a crash never leaves a half-written file or folder in place."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import click

from .errors import CultvlmError


def replace_folder(new: Path, target: Path) -> None:
    """Swap the finished folder `new` in at `target` by renames; a reader sees the old or the
    new folder, never a mix."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def partial_folder(target: Path) -> Path:
    """A fresh hidden sibling of `target` to build it in."""
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def write_json(path: Path, obj) -> None:
    """Write JSON via a temporary file and an atomic rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# JSON-lines logs (captions, image sources) are appended one line per item, so a crash loses
# at most the line being written.

def read_jsonl(path: Path, repair: bool = True) -> list[dict]:
    """The records of a JSON-lines file this project appends to. A crash mid-append can leave
    a torn last line (no newline): it is skipped with a note, and with `repair` also cut
    away so the file is valid again (readers that may run beside a writer pass repair=False).
    Any other bad line is an error naming it."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    tail = data[complete:]
    if tail.strip():
        try:
            json.loads(tail)
            whole = True  # only the newline is missing (e.g. edited by hand): keep the record
        except ValueError:
            whole = False
        if whole:
            if repair:
                with open(path, "ab") as f:
                    f.write(b"\n")
            data += b"\n"
            complete = len(data)
        else:
            click.echo(f"note: {path}: {'removed' if repair else 'skipped'} a torn last line "
                       f"({len(tail)} bytes) left by an interrupted run", err=True)
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(complete)
                    os.fsync(f.fileno())
    records = []
    for number, line in enumerate(data[:complete].decode("utf-8", errors="replace").split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise CultvlmError(f"{path}:{number}: not a JSON object; fix or delete that line")
        records.append(record)
    return records


def append_jsonl(path: Path, record: dict) -> None:
    """One line in one write, flushed to disk before we go on."""
    with open(path, "ab") as f:
        f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
