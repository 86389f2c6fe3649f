"""The starter solution that `backprop-ninja exercise FILE` writes: lecture/solution_template.py."""

from __future__ import annotations

from pathlib import Path

from backprop_ninja.errors import UserError
from backprop_ninja.files import atomic_write

TEMPLATE = Path(__file__).resolve().parent.parent / "lecture" / "solution_template.py"


def write_starter(dest: Path, force: bool = False) -> None:
    """Write the starter to dest, whole or not at all; refuse to overwrite unless `force`."""
    if dest.is_dir():
        raise UserError(f"{dest}: is a directory; give the path of the file to write")
    if dest.exists() and not force:
        raise UserError(f"{dest}: already exists; pass --force to overwrite it")
    if not dest.parent.is_dir():
        raise UserError(f"{dest.parent}: no such directory")
    try:
        atomic_write(dest, TEMPLATE.read_bytes())
    except OSError as err:
        raise UserError(f"{dest}: cannot write ({err.strerror})") from None
