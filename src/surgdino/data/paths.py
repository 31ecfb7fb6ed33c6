"""Paths users hand in: image file names that must stay inside their image root, and output folders."""

from __future__ import annotations

import os

from surgdino.errors import SurgDinoError


def outside_root(file_name: str) -> bool:
    """True if ``file_name`` (relative to an image root) is absolute or climbs out of the root with ``..``."""
    if os.path.isabs(file_name) or os.path.splitdrive(file_name)[0] or file_name.startswith(("/", "\\")):
        return True
    norm = os.path.normpath(file_name.replace("\\", "/"))
    return norm == ".." or norm.startswith("../")


def make_output_dir(path: str, flag: str) -> str:
    """Create the output folder ``path`` (and parents); an existing file there (or above) is a clear error."""
    path = os.path.expanduser(str(path))
    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        what = "is a file" if probe == os.path.abspath(path) else f"lies under the file {probe}"
        raise SurgDinoError(f"{flag} {path}: {what}, not a folder; give a folder for the outputs")
    os.makedirs(path, exist_ok=True)
    return path


def check_output_file(path: str, flag: str) -> str:
    """An output file path: not an existing folder, and its parent folder created (a file there is an error)."""
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        raise SurgDinoError(f"{flag} {path}: is a directory; give a file name, e.g. {os.path.join(path, 'metrics.json')}")
    make_output_dir(os.path.dirname(os.path.abspath(path)), flag)
    return path
