"""Where the pinned external tools live (scripts/dev_tools.sh installs them).

Tests that need one skip when it is missing, unless CLIPSEARCH_REQUIRE_TOOLS=1 (set by
.ci/run after installing them), which turns the skip into a failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS_BIN = (
    Path(os.environ.get("CLIPSEARCH_TOOLS", Path.home() / ".cache/clipsearch/tools")) / "bin"
)


def require(name: str) -> str:
    """Path of tool `name` (the pinned cache, then PATH); skip or fail when it is missing."""
    pinned = TOOLS_BIN / name
    if os.access(pinned, os.X_OK):
        return str(pinned)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed: run scripts/dev_tools.sh"
    if os.environ.get("CLIPSEARCH_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)
