"""Atomic storage: the atomic writes, locks, strict JSON and checked reading that every artifact uses."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from interp.core.errors import UserError

def _default_mode(is_dir: bool) -> int:
    """The permissions a plain open()/mkdir() would give under the current umask (mkstemp/mkdtemp give owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see either the old content or the whole new one, never a part (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see either the old content or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode(is_dir=False))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Strict JSON (json.org's: no bare NaN or Infinity): see dumps_strict."""
    atomic_write_text(path, dumps_strict(obj, indent=2) + "\n")


# --- strict JSON: what any JSON reader accepts ---------------------------------------------------------------------

# Top-level key of a JSON object that lists its non-finite numbers: each was written as null, and this key says why
# (a JSON pointer to it -> "NaN", "Infinity" or "-Infinity"), so that "not a number" and "undefined" (a plain null)
# stay apart. read_json puts the numbers back.
NONFINITE_KEY = "nonfinite"
_NONFINITE_NAMES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _nonfinite_name(x: float) -> str:
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _finite_tree(obj, pointer: str, found: dict):
    """A copy of `obj` that json.dumps(allow_nan=False) accepts: numpy values made plain, non-finite floats made None
    (their JSON pointers and kinds recorded in `found`)."""
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    elif isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        found[pointer or "/"] = _nonfinite_name(obj)
        return None
    if isinstance(obj, dict):
        return {k: _finite_tree(v, f"{pointer}/{_escape(str(k))}", found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_tree(v, f"{pointer}/{i}", found) for i, v in enumerate(obj)]
    return obj


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def strict_tree(obj):
    """`obj` ready for strict JSON: non-finite floats become null, and a top-level object gains NONFINITE_KEY that
    names each of them (JSON pointer -> "NaN" / "Infinity" / "-Infinity")."""
    found: dict[str, str] = {}
    plain = _finite_tree(obj, "", found)
    if found and isinstance(plain, dict):
        plain = {**plain, NONFINITE_KEY: found}
    return plain


def dumps_strict(obj, **kw) -> str:
    """json.dumps that never writes bare NaN or Infinity (which strict readers such as JavaScript's JSON.parse
    reject): those are written as null and named under NONFINITE_KEY (see strict_tree)."""
    return json.dumps(strict_tree(obj), allow_nan=False, default=_json_default, **kw)


def restore_nonfinite(value):
    """The inverse of strict_tree on what json.loads returned: the nulls named under NONFINITE_KEY become NaN or
    ±Infinity again and the key is dropped. Anything that does not fit (a damaged key) is left as it is."""
    if not isinstance(value, dict) or not isinstance(value.get(NONFINITE_KEY), dict):
        return value
    marks = value[NONFINITE_KEY]
    if not all(isinstance(p, str) and p.startswith("/") and isinstance(m, str) and m in _NONFINITE_NAMES for p, m in marks.items()):
        return value
    value = {k: v for k, v in value.items() if k != NONFINITE_KEY}
    for pointer, mark in marks.items():
        parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
        node = value
        try:
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node[part]
            last = parts[-1]
            if isinstance(node, list) and node[int(last)] is None:
                node[int(last)] = _NONFINITE_NAMES[mark]
            elif isinstance(node, dict) and node.get(last, 0) is None:
                node[last] = _NONFINITE_NAMES[mark]
        except (KeyError, IndexError, ValueError, TypeError):
            continue
    return value


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


# --- locks: one writer per folder --------------------------------------------------------------------------------

# Locks this process holds, by lock-file path: nested use (analyze's --out, then atomic_dir on the same folder inside
# it) must not block on itself. flock locks belong to an open file, so a second open in the same process would.
_HELD: dict[str, list] = {}
_HELD_GUARD = threading.Lock()


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of a folder or file: beside it, so that the folder itself can be replaced in one rename."""
    path = Path(os.path.abspath(path))
    return path.parent / f".{path.name}.lock"


class FolderLocked(UserError):
    """Another process holds the folder's write lock."""


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        return "another process"
    return f"process {pid}" if pid.isdigit() else "another process"


@contextmanager
def folder_lock(path: str | os.PathLike, *, hint: str = "wait for it to finish or choose another --out"):
    """Hold the write lock of `path` (a folder or a file, existing or not) for the block.

    A second writer, in another process, gets a one-line UserError naming the process that holds it. The lock is
    an `fcntl.flock` on a `.NAME.lock` file beside `path`: the kernel releases it when its holder dies, even by
    SIGKILL, so a lock is never stale. The file holds the holder's PID for the message and is removed on release.
    """
    lock = lock_path(path)
    key = str(lock)
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None and held[0] == os.getpid():
            held[1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield lock
        finally:
            with _HELD_GUARD:
                _HELD[key][1] -= 1
        return
    try:
        created = _make_parents(lock.parent)
    except OSError as err:  # a part of the path is a file, or the place is read-only
        raise UserError(f"{path} cannot be created ({err.strerror or err}); choose another folder") from None
    try:
        fd = _acquire(lock, Path(path), hint)
    except BaseException:
        _remove_if_empty(created)
        raise
    with _HELD_GUARD:
        _HELD[key] = [os.getpid(), 1]
    try:
        yield lock
    finally:
        with _HELD_GUARD:
            _HELD.pop(key, None)
        _release(lock, fd)
        _remove_if_empty(created)  # a command that failed leaves no empty folders behind


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        f.mkdir(exist_ok=True)
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    for f in folders:
        try:
            f.rmdir()
        except OSError:  # not empty (the result is in it) or gone: keep going up only while empty
            return


try:
    import fcntl
except ImportError:  # Windows: an O_EXCL lock file with the holder's PID; a dead holder's file is taken over
    fcntl = None  # type: ignore[assignment]


def _acquire(lock: Path, path: Path, hint: str) -> int:
    if fcntl is None:
        return _acquire_exclusive(lock, path, hint)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except NotADirectoryError:
            raise UserError(f"{path} cannot be created: a part of {path.parent} is a file, not a folder") from None
        except OSError as err:
            raise UserError(f"{path} cannot be written ({err.strerror or err}); choose another folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderLocked(f"{path} is being written by {_holder(lock)}; {hint}") from None
        # The previous holder may have removed the file between our open and our lock: then we locked a file
        # nobody else can see, and must lock the current one instead.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _release(lock: Path, fd: int) -> None:
    if fcntl is None:
        os.close(fd)
        lock.unlink(missing_ok=True)
        return
    # Removed while still locked, so that a waiter that opened the old file notices (samestat) and retries.
    lock.unlink(missing_ok=True)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _acquire_exclusive(lock: Path, path: Path, hint: str) -> int:
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            pid = holder.split()[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                lock.unlink(missing_ok=True)  # stale: its holder died without cleaning up
                continue
            raise FolderLocked(f"{path} is being written by {holder}; {hint}") from None
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd
    raise FolderLocked(f"{path} is being written by {_holder(lock)}; {hint}")


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename, on failure it vanishes.

    Everything happens under `path`'s folder lock, and without `overwrite` an existing `path` is refused both on
    entry and again right before the rename: a folder that appeared meanwhile is never replaced.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; choose another folder or pass --overwrite")
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a folder; choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(path):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        os.chmod(tmp, _default_mode(is_dir=True))
        try:
            yield tmp
            if path.exists() and not overwrite:
                raise UserError(f"{path} appeared while this result was written; nothing was replaced, pass --overwrite to replace it")
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                os.replace(path, old / "x")
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def update_json(path: str | os.PathLike, fn, *, default=None):
    """Read-modify-write a JSON file under its lock: `fn(current)` returns the new content (`current` is `default`
    when the file is missing); the file is replaced atomically. Returns what was written.

    Two processes updating the same file (two students added to one run.json) take turns instead of losing an update;
    the lock is waited for, since an update takes milliseconds.
    """
    path = Path(path)
    deadline = time.monotonic() + 30
    while True:
        try:
            with folder_lock(path, hint="it is updated by another command; try again"):
                current = read_json(path) if path.exists() else default
                new = fn(current)
                atomic_write_json(path, new)
                return new
        except FolderLocked:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def check_out(path: str | os.PathLike, overwrite: bool = False, option: str = "--out") -> Path:
    """Before any work: `path` can become a result folder. It must not be a file, must not exist unless `overwrite`,
    and its nearest existing parent must be a folder this process can write in. Nothing is created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file; give a folder path")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; choose another folder or pass --overwrite")
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{option} {path} cannot be created: {parent} is a file, not a folder")
    try:  # os.access says yes to root on a read-only file system: try for real, leaving nothing behind
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise UserError(f"{option} {path} cannot be written ({err.strerror or err} in {parent}); choose another folder") from None
    return path


# --- names: identifiers, never paths --------------------------------------------------------------------------------

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
NAME_RULE = "1 to 64 letters, digits, '-' or '_', the first a letter or digit"


def check_name(name, what: str = "name", where: str | os.PathLike | None = None) -> str:
    """THE name rule for what becomes a folder: a study, a student, a suite's run folder, a run. A name is an
    identifier, not a path (no '/', '..', NUL, spaces, leading dot or dash, at most 64 characters), so `parent / name`
    is always a folder directly inside `parent`. Returns the name; otherwise a one-line UserError."""
    if isinstance(name, str) and NAME_PATTERN.fullmatch(name):
        return name
    source = f"{where}: " if where else ""
    raise UserError(f"{source}{what} {shown_name(name)} is not a name: use {NAME_RULE} (a name, not a path)")


def shown_name(name) -> str:
    """A would-be name in an error message: quoted, cut short (with its length) when long, or its type."""
    if not isinstance(name, str):
        return f"of type {type(name).__name__}"
    return repr(name if len(name) <= 40 else name[:40] + "…") + (f" ({len(name)} characters)" if len(name) > 64 else "")


# --- reading --------------------------------------------------------------------------------------------------------


def read_regular(path: str | os.PathLike, what: str = "file") -> bytes:
    """The bytes of a regular file. A FIFO, socket or device is refused without blocking (it is opened with
    O_NONBLOCK and checked with fstat before any read), so that no reader hangs on a planted `mkfifo run.json`."""
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a {what}") from None
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err})") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise UserError(f"{path} is a folder, not a {what}")
        if not stat.S_ISREG(mode):
            raise UserError(f"{path} is not a regular file (a pipe, socket or device); pass a {what}")
        chunks: list[bytes] = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err})") from None
    finally:
        os.close(fd)


def is_regular(path: str | os.PathLike) -> bool:
    """Whether `path` is a regular file (following links), without opening it: for readers that open the file
    themselves (safetensors, tokenizers) and would block on a FIFO."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False



def check_member_name(name, where: str | os.PathLike | None = None) -> str:
    """A name that stands for a folder inside a run (a student): one plain path component, so that `run / name`
    stays inside the run whatever run.json says. Returns the name; otherwise a one-line UserError."""
    source = f"{where}: " if where else ""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{source}member name {name!r} is not a folder name; expected a non-empty string")
    bad = (name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name or "\x00" in name
           or os.path.isabs(name) or (os.sep in name) or (os.altsep is not None and os.altsep in name)
           or name != name.strip() or Path(name).drive)
    if bad:
        raise UserError(f"{source}member name {name!r} is not a plain folder name inside the run "
                        "(no slashes, no leading dot, no '..'); the run folder may have been tampered with")
    return name


def read_json(path: str | os.PathLike, expect: type | None = None):
    """Read a JSON file, or fail in one line naming the file; `expect=dict` (or list) also checks the top-level type."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} is missing")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a JSON file")
    data = read_regular(path, "JSON file")
    try:
        value = restore_nonfinite(json.loads(data.decode("utf-8-sig")))
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is damaged (not UTF-8 text at byte {err.start}); rerun the command that wrote it") from err
    except (ValueError, RecursionError) as err:
        detail = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deeply or too large"
        raise UserError(f"{path} is damaged (not valid JSON: {detail}); rerun the command that wrote it") from err
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err})") from err
    if expect is not None and not isinstance(value, expect):
        raise UserError(f"{path} is damaged: expected a JSON {_json_kind(expect)}, found {_json_kind(type(value))}")
    return value


def _json_kind(kind: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(kind, kind.__name__)


def read_text_file(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file's content (a BOM is dropped), or a one-line UserError for a missing, folder, binary or
    non-UTF-8 file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a {what}; pass the file itself")
    if not path.is_file():
        raise UserError(f"{path} does not exist" if not path.exists() else f"{path} is not a regular file; pass a {what}")
    data = read_regular(path, what)
    if b"\x00" in data:
        raise UserError(f"{path} is binary (it holds NUL bytes), not a {what} of UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                        f"save it as UTF-8") from None


def jsonl_records(text: str, where: str | os.PathLike, *, partial_ok: bool = False):
    """(line number, value) for each non-blank line of JSONL text: THE JSONL reader of the toolkit. Lines end at "\n"
    only: str.splitlines() would also cut at characters JSON strings may hold raw (U+2028, \x1c). A line that is not
    JSON is a UserError naming `where` and the line, except, with `partial_ok=True`, a last line without its newline:
    a writer killed mid-line leaves one (metrics.jsonl), and it is skipped. Values get their non-finite numbers back."""
    lines = text.split("\n")
    complete = text.endswith("\n")
    for i, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError) as err:
            if partial_ok and i == len(lines) and not complete:
                return
            detail = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deeply or too large"
            raise UserError(f"{where}, line {i}: not valid JSON ({detail})") from None
        yield i, restore_nonfinite(value)


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = (), check=None, *, partial_ok: bool = False,
               allow_empty: bool = False) -> list[dict]:
    """Records from a JSONL file, each an object whose `required` fields are non-empty strings; `check(record)` may
    raise UserError for more. A bad line is an error naming the file and the line.

    `partial_ok=True` skips a last line that is not valid JSON and has no newline: a writer killed mid-line leaves
    one (metrics.jsonl). `allow_empty=True` returns [] for a file without records instead of failing.
    """
    path = Path(path)
    text = read_text_file(path, "JSONL file")
    records = []
    for i, record in jsonl_records(text, path, partial_ok=partial_ok):
        if not isinstance(record, dict):
            raise UserError(f"{path}, line {i}: expected a JSON object with {', '.join(required) or 'fields'}")
        for key in required:
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise UserError(f"{path}, line {i}: missing or empty field '{key}'")
        if check is not None:
            try:
                check(record)
            except UserError as err:
                raise UserError(f"{path}, line {i}: {err}") from None
        records.append(record)
    if not records and not allow_empty:
        raise UserError(f"{path} has no records")
    return records


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one record as a line of strict JSON (non-finite numbers named, see dumps_strict)."""
    with Path(path).open("a") as f:
        f.write(dumps_strict(record) + "\n")
