"""What every command prints and how it refuses: shared by cli.py and the admin commands."""

from __future__ import annotations

import getpass
import json
import sys
from typing import Any


class CommandError(Exception):
    """A refused request, worded for the admin."""


def print_rows(rows: list[dict[str, Any]], as_json: bool, columns: list[str]) -> None:
    """Data on stdout: a JSON list, or a table of `columns`."""
    if as_json:
        json.dump(rows, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return
    table = [[_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max([len(col), *(len(r[i]) for r in table)]) for i, col in enumerate(columns)]
    for line in [columns, *table]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
              .rstrip())


def read_password() -> str:
    """One line from stdin when piped; otherwise a prompt, typed twice."""
    if not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise CommandError("passwords do not match")
    if not password:
        raise CommandError("empty password")
    if any(ch in password for ch in "\0\r\n"):
        raise CommandError("password contains control characters")
    return password


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)
