"""Result files of the benchmarks, each written whole or not at all: a run cut short (the sessions
here end at a fixed time) never leaves half a JSON file for the next resumed run to choke on."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from embcompress.io import atomic_write_bytes


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Replace ``path`` with ``text`` atomically (folders created as needed)."""
    return atomic_write_bytes(path, text.encode())


def write_json(path: str | os.PathLike[str], value: Any, indent: int | None = 1) -> Path:
    """Replace ``path`` with ``value`` as JSON atomically."""
    return write_text(path, json.dumps(value, indent=indent) + "\n")
