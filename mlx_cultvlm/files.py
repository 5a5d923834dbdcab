"""Writing outputs so that a crash never leaves a half-written file or folder in place."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


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
