"""The checkpoint file on disk: atomic writes, a checksum, and nothing else.

A checkpoint is a plain ``.npz`` (a zip of ``.npy`` arrays, which ``np.load``
reads) whose zip comment, the last bytes of the file, is a fixed-length
trailer ``backprop-checkpoint sha256 <64 hex digits>``: the SHA-256 of every
byte before it. Reading checks the trailer before it parses anything, so a
file that was truncated, corrupted anywhere (in the data, the zip headers or
the trailer itself), emptied, or written by another program is refused with
one ``ValueError`` that names the path. Arrays are read with
``allow_pickle=False``: a checkpoint never runs code.

Writing goes to a temporary file in the destination's folder, which is synced
and then renamed over the destination (``os.replace``, atomic on POSIX and
Windows), so the destination is always either the old checkpoint or the new
one. The temporary file is created with mode ``0o666`` filtered by the umask,
as ``open`` would create it (``tempfile.mkstemp`` would make it ``0o600``), and
its name says whose it is: ``.<name>.<pid>.<random>.backprop-tmp``. A save
killed before its rename leaves that file behind; the next save into the same
folder removes every such file whose process is gone, and ``load`` refuses to
read one.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import struct
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TEMP_SUFFIX", "is_temporary", "read_arrays", "remove_stale", "write_arrays"]

TEMP_SUFFIX = ".backprop-tmp"
_TEMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}" + re.escape(TEMP_SUFFIX) + "$")
_MAGIC = b"backprop-checkpoint sha256 "
_TRAILER = len(_MAGIC) + 64
_EOCD = b"PK\x05\x06"  # the zip's end-of-central-directory record, 22 bytes with no comment
_EOCD_SIZE = 22
_BLOCK = 1 << 20


class CheckpointError(ValueError):
    """A file that is not a whole, valid backprop checkpoint."""


def is_temporary(path: Path) -> bool:
    """True for the name of a save's temporary file."""
    return _TEMP.match(path.name) is not None


def remove_stale(folder: Path) -> list[Path]:
    """Remove the temporary files of saves whose process is gone; return them."""
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for path in entries:
        match = _TEMP.match(path.name)
        if match is None or _alive(int(match.group(1))):
            continue
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:  # another save cleaned it first
            pass
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (this one counts: a save may be under way in a thread)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # it exists, but belongs to someone else
        return True
    return True


def write_arrays(target: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as a checksummed ``.npz`` at ``target``, atomically."""
    folder = target.parent
    remove_stale(folder)
    tmp = folder / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "w+b") as f:
            np.savez(f, allow_pickle=False, **arrays)
            _seal(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(folder)


def _seal(f: Any) -> None:
    """Turn the zip just written into a checkpoint: its comment becomes the trailer."""
    end = f.seek(0, os.SEEK_END)
    f.seek(end - _EOCD_SIZE)
    record = f.read(_EOCD_SIZE)
    if record[:4] != _EOCD or record[-2:] != b"\x00\x00":
        raise RuntimeError("save: numpy wrote a zip without its end record where expected")
    f.seek(end - 2)
    f.write(struct.pack("<H", _TRAILER))
    digest = _digest(f, end)
    f.seek(end)
    f.write(_MAGIC + digest.encode("ascii"))


def _digest(f: Any, size: int) -> str:
    """The SHA-256 (hex) of the first ``size`` bytes of the open file ``f``."""
    h = hashlib.sha256()
    f.seek(0)
    left = size
    while left:
        block = f.read(min(_BLOCK, left))
        if not block:
            break
        h.update(block)
        left -= len(block)
    return h.hexdigest()


def _sync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_arrays(source: Path) -> dict[str, np.ndarray]:
    """Every array of the checkpoint at ``source``, after its checksum; else one
    ``CheckpointError`` naming the path and what is wrong."""
    where = f"load: {str(source)!r}"
    if is_temporary(source):
        raise CheckpointError(
            f"{where} is the temporary file of a save that did not finish, not a checkpoint"
        )
    with open(source, "rb") as f:
        data = f.read()
    if not data:
        raise CheckpointError(f"{where} is empty: not a checkpoint")
    size = len(data) - _TRAILER
    if size < _EOCD_SIZE or data[size : size + len(_MAGIC)] != _MAGIC:
        raise CheckpointError(
            f"{where} is not a backprop checkpoint, or is truncated: it does not end with "
            f"the checkpoint trailer (an .npz written by backprop.save)"
        )
    if hashlib.sha256(data[:size]).hexdigest().encode("ascii") != data[size + len(_MAGIC) :]:
        raise CheckpointError(
            f"{where} is corrupt: its contents do not match the checksum written with them"
        )
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except Exception as e:  # noqa: BLE001 - whatever numpy or zipfile raise, one error
        raise CheckpointError(f"{where} cannot be read as arrays: {e}") from e
