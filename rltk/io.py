"""Small file helpers: every report and checkpoint is written atomically (temp file, then rename)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def check_writable(directory: str | Path) -> None:
    """Raise ``PermissionError`` with the path when ``directory`` cannot be created or written."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise PermissionError(f"output directory '{directory}' is not writable: {exc.strerror or exc}") from None


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so a rename or a new entry in it survives a power loss; best effort
    (some filesystems refuse to open or sync a directory)."""
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


def fsync_tree(root: str | Path, files: bool = True) -> None:
    """fsync every file (when ``files``) and every directory under ``root``."""
    if not Path(root).is_dir():
        return
    for dirpath, _, filenames in os.walk(root):
        if files:
            for name in filenames:
                try:
                    fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                except OSError:
                    continue
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(dirpath)


def replace_dir(tmp: str | Path, final: str | Path, *, sync: bool = True) -> None:
    """Put the complete directory ``tmp`` in place as ``final`` (a sibling: same filesystem), so
    that ``final`` only ever names a whole directory, the old one or the new one.

    With ``sync`` every file and directory under ``tmp`` is fsynced first (pass False when the
    caller already has). An existing ``final`` is renamed aside to ``.<name>.old`` and deleted only
    once ``tmp`` holds its name; the parent directory is fsynced after the renames."""
    tmp, final = Path(tmp), Path(final)
    if sync:
        fsync_tree(tmp)
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
