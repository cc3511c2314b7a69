"""clipsearch: cross-modal (text ⇄ image) search over gRPC.

The shared kernel: generated stubs (`clipsearch.v1`), settings, domain types, the client SDK,
the CLI and the local launcher.
"""

from clipsearch.client import Client, Document, Hit, SearchResult, StoredDocument
from clipsearch.types import TextOptions

__all__ = ["Client", "Document", "Hit", "SearchResult", "StoredDocument", "TextOptions"]
__version__ = "0.1.0"
