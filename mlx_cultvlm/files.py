"""Writing outputs so that a crash never leaves a half-written file or folder in place."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

import click

from .errors import CultvlmError


def printable(path) -> str:
    """A path as text that prints and fits in UTF-8 JSON: bytes of a file name that are not
    UTF-8 (a name made on another system) are shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def utf8_name(path) -> bool:
    """False for a file name that is not valid UTF-8 (Python holds it with surrogate escapes)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


NOT_UTF8 = "file name is not valid UTF-8; rename it"


def incomplete_safetensors(folder: Path) -> list[str]:
    """The *.safetensors files in `folder` that are shorter than their own header says, as
    "name (N of M bytes)". MLX's mx.save_safetensors(path, ...) -- which mlx-vlm uses -- does not
    report a failed write: a full disk leaves such a file and no error. An interrupted download
    leaves one too."""
    short = []
    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if 8 + n > size:
                    short.append(f"{f.name} ({size} of at least {8 + n} bytes)")
                    continue
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError):
            short.append(f"{f.name} (not a safetensors file)")
            continue
        if size < 8 + n + end:
            short.append(f"{f.name} ({size} of {8 + n + end} bytes)")
    return short


# A command deletes only what it wrote. A folder it builds whole (a model, a dataset, a report)
# records its entries in OWNED; a folder it fills with fixed names (lora, eval) names them in
# the command's `own` patterns. Anything else in the folder is the user's, and is never deleted.
OWNED = ".cultvlm-owned.json"


def foreign_entries(folder: Path, own: tuple[str, ...] = ()) -> list[str]:
    """The entries of `folder` that cultvlm did not write there: not in its OWNED record and
    matching none of `own`."""
    if not folder.is_dir():
        return []
    try:
        recorded = set(json.loads((folder / OWNED).read_text(encoding="utf-8"))["entries"])
    except (OSError, ValueError, KeyError, TypeError):
        recorded = set()
    return sorted(p.name for p in folder.iterdir()
                  if p.name != OWNED and p.name not in recorded and not any(fnmatch(p.name, o) for o in own))


def check_replaceable(folder: Path, command: str, own: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, to replace a folder holding files `command` did not write."""
    foreign = foreign_entries(Path(folder), own)
    if foreign:
        shown = ", ".join(printable(n) for n in foreign[:3]) + (f" and {len(foreign) - 3} more"
                                                                 if len(foreign) > 3 else "")
        raise CultvlmError(f"{folder}: holds {shown}, which `cultvlm {command}` did not write, and it deletes "
                           "only its own files: move them away or choose another --out")


def remove_own(folder: Path, command: str, own: tuple[str, ...]) -> None:
    """--force for a command that writes fixed names: delete those, refuse if anything else is there."""
    check_replaceable(folder, command, own)
    for entry in folder.iterdir() if folder.is_dir() else ():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def check_out_apart(out, command: str, may_hold: tuple[str, ...] = (), **inputs) -> None:
    """Refuse an --out that is, holds or is inside one of the command's inputs (by name, as the
    option is called): writing there would mix outputs into an input, or replace it. `may_hold`:
    inputs the folder may contain (eval's run folder holding the adapter it evaluates, as an
    experiment lays runs out: eval writes and deletes only its own file names)."""
    where = Path(out).resolve()
    for name, path in inputs.items():
        if path is None or not str(path):
            continue
        given = Path(path).resolve()
        if where == given or given in where.parents or (where in given.parents and name not in may_hold):
            relation = "is" if where == given else "is inside" if given in where.parents else "holds"
            raise CultvlmError(f"--out {out}: {relation} the {name.replace('_', ' ')} {path} of `cultvlm {command}`; "
                               "choose an --out apart from its inputs")


@contextmanager
def output_lock(out, command: str):
    """One writer per output: a lock file beside `out` (`.NAME.lock`, so that --force and the
    folder swaps never touch it) holding the writer's pid, removed when the block ends. A lock
    whose process is gone (killed) is taken over; a live one refuses the second writer."""
    out = Path(out)
    lock = out.parent / f".{out.name}.lock"
    out.parent.mkdir(parents=True, exist_ok=True)
    mine = json.dumps({"pid": os.getpid(), "command": command})
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text(encoding="utf-8"))
                pid = int(holder["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                holder, pid = {}, None  # half-written by a writer killed at that moment
            if pid is not None and pid != os.getpid() and _alive(pid):
                raise CultvlmError(f"{out}: in use by `cultvlm {holder.get('command', '?')}` (pid {pid}); wait "
                                   f"for it to finish, or stop it (if no such process runs, delete {lock})") from None
            lock.unlink(missing_ok=True)  # stale: its writer is gone
            continue
        os.write(fd, mine.encode())
        os.close(fd)
        break
    else:
        raise CultvlmError(f"{lock}: could not take the lock (another writer keeps taking it)")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:  # Linux: a killed process nobody has reaped yet (a zombie) still answers kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def replace_folder(new: Path, target: Path, command: str | None = None, own: tuple[str, ...] = ()) -> None:
    """Swap the finished folder `new` in at `target` by renames; a reader sees the old or the
    new folder, never a mix. With `command`: refused if `target` holds what it did not write
    (see check_replaceable), and `new` records its entries as the command's."""
    if command:
        check_replaceable(target, command, own)
        write_json(new / OWNED, {"command": command, "entries": sorted(p.name for p in new.iterdir())})
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def check_complete(folder: Path) -> None:
    """OSError(ENOSPC) if a safetensors file in `folder` is shorter than its header says."""
    short = incomplete_safetensors(folder)
    if short:
        raise OSError(errno.ENOSPC, f"{', '.join(short)} written incompletely (is the disk full?)")


@contextmanager
def model_folder(target: Path, verb: str, command: str):
    """Build a model folder in a hidden `.NAME.partial` sibling (yielded, not yet created) and
    rename it into place when the block ends. A write error (disk full, quota, read-only) --
    including the short safetensors files MLX leaves without reporting one -- removes the
    partial folder and becomes one line; the existing `target` is left as it was."""
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        yield partial
        check_complete(partial)
    except OSError as e:
        if e.errno is None:
            raise
        shutil.rmtree(partial, ignore_errors=True)
        kept = "the existing folder is unchanged" if target.exists() else "nothing was written"
        raise CultvlmError(f"{target}: {verb} failed: {e.strerror or e}"
                           + (f" ({e.filename})" if e.filename else "") + f"; {kept}") from None
    replace_folder(partial, target, command)


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
