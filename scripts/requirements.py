"""Print the pinned runtime + test requirements of pyproject.toml, one per line (for pip -r)."""

from __future__ import annotations

import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
deps = project["project"]["dependencies"] + project["project"]["optional-dependencies"]["test"]
print("\n".join(deps))
