"""A local thumbnail store written at ingest and read by `clipsearch ui`.

Documents on the server hold embeddings, metadata and a caption, never image bytes, so
the page needs its thumbnails from somewhere else: `clipsearch ingest --thumbnails DIR`
writes a small JPEG per document here. File names are the SHA-256 of the id (ids are
opaque client strings and never become file names themselves).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

from PIL import Image

THUMBNAIL_SIDE = 160


class ThumbnailStore:
    """JPEG thumbnails keyed by document id under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, doc_id: str) -> Path:
        digest = hashlib.sha256(doc_id.encode("utf-8")).hexdigest()
        return self.root / digest[:2] / f"{digest}.jpg"

    def put(self, doc_id: str, image: bytes) -> None:
        """Write the thumbnail of an encoded image (atomically: temp file, then rename)."""
        with Image.open(io.BytesIO(image)) as decoded:
            thumb = decoded.convert("RGB")
            thumb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        target = self.path_for(doc_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as out:
            thumb.save(out, format="JPEG", quality=85)
        os.replace(tmp, target)

    def get(self, doc_id: str) -> bytes | None:
        """The thumbnail's JPEG bytes, or None when there is none."""
        path = self.path_for(doc_id)
        return path.read_bytes() if path.is_file() else None
