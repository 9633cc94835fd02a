"""Files written whole or not at all, and the temporaries that killed writers leave behind.

Every writer in resnetlab (checkpoints, metrics, configs, exported models, the decoded-data cache) writes into a
hidden sibling ``.<name>.tmp-<pid>-<rand>@<host><suffix>`` and ``os.replace``s it onto the real name, so a
reader sees the old file or the new one, never half of one. A process killed mid-write leaves its temporary
behind; the next writer of the same name removes the temporaries whose process is gone (same host) or that are
a week old (:func:`remove_stale_temporaries`).

This module imports nothing from resnetlab: every layer may use it.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

TMP_MARK = ".tmp-"
STALE_AFTER_S = 7 * 24 * 3600  # a temporary this old is removed even if its owner cannot be checked


def temporary_sibling(path: Path, *, keep_suffix: bool = False) -> Path:
    """A fresh hidden name beside ``path`` that names this process and host (see the module docstring).

    ``keep_suffix`` repeats ``path``'s suffix at the end, for writers that check it (``torch.export.save``
    wants ``.pt2``).
    """
    suffix = path.suffix if keep_suffix else ""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
                          f"{suffix}")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (POSIX signal 0; a process of another user counts)."""
    try:
        os.kill(pid, 0)  # signal 0: an existence check only
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True
    return True


def is_stale_temporary(entry: Path, now: float | None = None) -> bool:
    """Whether ``entry`` is a temporary (named by :func:`temporary_sibling`) whose writer is over: its process is
    gone (same host), or it is older than a week."""
    if not (entry.name.startswith(".") and TMP_MARK in entry.name):
        return False
    pid, _, rest = entry.name.rsplit(TMP_MARK, 1)[1].partition("-")
    host = rest.partition("@")[2]
    if os.name == "posix" and pid.isdigit() and host and (host == socket.gethostname()
                                                         or host.startswith(socket.gethostname() + ".")):
        if not pid_alive(int(pid)):
            return True
    try:
        return (time.time() if now is None else now) - entry.stat().st_mtime > STALE_AFTER_S
    except OSError:
        return False


def remove_stale_temporaries(folder: Path, name: str | None = None, keep: Path | None = None) -> None:
    """Remove the stale temporaries (files or folders) in ``folder``: those of ``name`` only, or all of them.

    Never raises: a temporary that cannot be removed now is tried again by the next writer.
    """
    pattern = f".{name}{TMP_MARK}*" if name is not None else f".*{TMP_MARK}*"
    try:
        entries = list(folder.glob(pattern))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        if entry == keep or not is_stale_temporary(entry, now):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()
        except OSError:
            pass


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: str | bytes | Callable[[Path], None], *, durable: bool = False,
                 keep_suffix: bool = False, before_replace: Callable[[], None] | None = None) -> Path:
    """Write ``data`` to ``path`` whole or not at all; return ``path``.

    ``data`` is text (UTF-8), bytes, or a function that writes the file at the path it is given (a library
    saver such as ``onnx.save``). ``durable`` fsyncs the file and then its folder, so the new content survives a
    power cut, not only a killed process. ``before_replace`` runs after the file is complete and just before the
    rename (the checkpoint writer keeps the previous checkpoint there). Stale temporaries of ``path`` are removed
    first. On any error the temporary is removed, ``path`` is untouched and the error propagates.
    """
    path = Path(path)
    tmp = temporary_sibling(path, keep_suffix=keep_suffix)
    remove_stale_temporaries(path.parent, path.name, keep=tmp)
    try:
        if callable(data):
            data(tmp)
            if durable:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
