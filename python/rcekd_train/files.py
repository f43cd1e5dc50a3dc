"""The one place where the drivers write and read a run's files.

* Writes are atomic: the bytes go to a temporary file in the target's folder whose name is unique to
  its writer (``.<name>.<random>.tmp``, ``tempfile.mkstemp``), are flushed to the disk (``fsync``, for
  checkpoints and weights: text files such as the history are rewritten from the checkpoint every
  epoch) and the temporary file replaces the target (``os.replace``). A reader sees the old file or the new one,
  never half of one; a failure (a full disk, a permission error) raises :class:`FileWriteError`, which
  names the target and the reason, and removes the temporary file, so the old file stays as it was.
* :func:`load_torch` reads a checkpoint or a weights file and says so when it is truncated or not one
  (:class:`CorruptFileError`) instead of torch's zip-reader message.
* :func:`remove_stale_temps` removes the temporary files a killed writer left behind (called by a run
  that holds its directory's lock, so that no live writer owns them).
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import tempfile
from typing import Callable, Dict, Iterable, List, Optional

TEMP_SUFFIX = ".tmp"
_UMASK = os.umask(0)
os.umask(_UMASK)


class FileWriteError(OSError):
    """A file of a run could not be written (full disk, permissions, ...): names the file and the reason."""

    def __init__(self, path: str, err: BaseException):
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        super().__init__(getattr(err, "errno", None) or errno.EIO, f"cannot write {path}: {reason}")
        self.path = path

    def __str__(self) -> str:
        return str(self.strerror)


class CorruptFileError(ValueError):
    """A checkpoint or weights file that cannot be read back: truncated, empty or not one."""


class _Sink:
    """The binary handle a writer gets: it writes through :func:`_write_chunk` and keeps the first OSError,
    which torch's writer would otherwise turn into a RuntimeError without the reason. ``path`` is the file
    being written, ``tmp`` its temporary file."""

    def __init__(self, f, path: str, tmp: str):
        self.file, self.path, self.tmp = f, path, tmp
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return _write_chunk(self, data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.file.flush()


def _write_chunk(sink: _Sink, data) -> int:
    """Where the bytes of every write go (tests replace it to fill a fake disk)."""
    return sink.file.write(data)


def atomic_write(path: str, write: Callable[[_Sink], None], durable: bool = True) -> None:
    """Calls ``write(f)`` with a binary handle on a temporary file next to ``path``, then makes it ``path``
    (see the module docstring; ``durable``: fsync before the replace, so that a power cut leaves the old file
    or the new one, not an empty one); raises FileWriteError naming ``path`` when the disk or the system
    refuses."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=TEMP_SUFFIX)
        with os.fdopen(fd, "wb") as f:
            sink = _Sink(f, path, tmp)
            try:
                write(sink)
            except Exception as e:
                if sink.error is not None:  # the disk's error, not the serialiser's rewording of it
                    raise sink.error from e
                raise
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # the permissions of a plainly created file, not mkstemp's 0600
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise FileWriteError(path, e) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str, durable: bool = False) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), durable)


def write_json(path: str, obj, indent: int = 1, durable: bool = False) -> None:
    write_text(path, json.dumps(obj, indent=indent), durable)


def write_csv(path: str, rows: List[Dict], fieldnames: Optional[Iterable[str]] = None) -> None:
    """Rows (dicts) as CSV with a header: ``fieldnames``, else every key in order of appearance."""
    cols: List[str] = list(fieldnames) if fieldnames is not None else []
    if fieldnames is None:
        for row in rows:
            cols += [k for k in row if k not in cols]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def append_line(path: str, line: str) -> None:
    """Appends one line to a log file; FileWriteError naming it when that fails."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        raise FileWriteError(path, e) from e


def copy_file(src: str, dst: str) -> None:
    """Copies ``src`` to ``dst`` through :func:`atomic_write`."""
    with open(src, "rb") as f:
        data = f.read()
    atomic_write(dst, lambda out: out.write(data), durable=False)


def save_torch(obj, path: str) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    import torch
    atomic_write(path, lambda f: torch.save(obj, f))


def load_torch(path: str, what: str = "file", keys: Iterable[str] = ()):
    """``torch.load(path)`` (CPU) of a file this package wrote; CorruptFileError when it is empty,
    truncated or not a torch file, or lacks one of ``keys``; FileNotFoundError when it is missing."""
    import torch
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as e:
        size = os.path.getsize(path) if os.path.exists(path) else 0
        first = str(e).split(". ")[0]
        how = "empty" if size == 0 else f"truncated or corrupt ({size} bytes; {type(e).__name__}: {first})"
        raise CorruptFileError(f"{path}: the {what} is {how}") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise CorruptFileError(f"{path}: not a {what} of this package (it lacks {missing})")
    return obj


def remove_stale_temps(folder: str) -> List[str]:
    """Removes the temporary files of :func:`atomic_write` in ``folder`` (left by a writer that was killed);
    returns their names. Only for a folder whose lock the caller holds."""
    removed = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                try:
                    os.remove(os.path.join(folder, name))
                    removed.append(name)
                except OSError:
                    pass
    return removed
