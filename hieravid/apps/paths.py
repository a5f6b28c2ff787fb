"""Checks of the paths a command will write, made before the command does any work.

A run that takes minutes must not fail at its last step because ``--trace`` names a folder, and a command must not
print a path it did not write (matplotlib adds ``.png`` to a name without a suffix, ``mkdir`` fails on a file).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hieravid.errors import HieravidError

__all__ = ["OutputPathError", "check_output_file", "check_output_folder"]


class OutputPathError(HieravidError, ValueError):
    """An output path cannot be written as asked."""


def _writable_parent(path: Path, option: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable folder (missing folders are created later)."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"{option} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {path}: the folder {ancestor} is not writable")


def _as_path(path: str | Path, option: str) -> Path:
    text = str(path)
    if not text or "\x00" in text:
        raise OutputPathError(f"{option} {text!r}: not a file name")
    return Path(text)


def check_output_file(path: str | Path, *, option: str, suffixes: Sequence[str] = ()) -> Path:
    """``path`` as a file this command may write (an existing file is replaced).

    Args:
        option: the option's name, for the message (``"--trace"``).
        suffixes: accepted suffixes (lower case, with the dot); empty: any.

    Raises:
        OutputPathError: a folder, a suffix not in ``suffixes``, or a parent that is a file or not writable.
    """
    path = _as_path(path, option)
    if path.is_dir():
        example = path / f"out{suffixes[0] if suffixes else ''}"
        raise OutputPathError(f"{option} {path}: is a folder; give a file name (e.g. {example})")
    if path.exists() and not path.is_file():
        raise OutputPathError(f"{option} {path}: not a regular file")
    if suffixes and path.suffix.lower() not in suffixes:
        raise OutputPathError(
            f"{option} {path}: the file name must end in {', '.join(suffixes[:-1])}"
            + (f" or {suffixes[-1]}" if len(suffixes) > 1 else suffixes[0])
        )
    _writable_parent(path, option)
    return path


def check_output_folder(path: str | Path, *, option: str, empty: bool = False) -> Path:
    """``path`` as a folder this command may write into (created if missing).

    Args:
        empty: refuse an existing folder that holds anything (the command would overwrite someone's files).

    Raises:
        OutputPathError: a file, a non-empty folder when ``empty``, or a parent that is a file or not writable.
    """
    path = _as_path(path, option)
    if path.exists():
        if not path.is_dir():
            raise OutputPathError(f"{option} {path}: exists and is not a folder; give a new folder name")
        if empty and any(path.iterdir()):
            raise OutputPathError(
                f"{option} {path}: the folder exists and is not empty; give a new folder name (nothing was written)"
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputPathError(f"{option} {path}: the folder is not writable")
        return path
    _writable_parent(path, option)
    return path
