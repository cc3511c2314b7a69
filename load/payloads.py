"""Request payloads for ghz: JSON arrays of messages that ghz sends round-robin.

The ghz configs in load/ghz/ read these files and the API's descriptor set
(clipsearch.protoset) from the directory ghz runs in. Texts are demo-style captions, images
are demo scenes rendered to PNG (base64, as protobuf's JSON mapping wants bytes), vectors are
random unit vectors of the server's dimension (read from AdminService.Stats). Usage against
any server:

    python -m load.payloads --server HOST:PORT --out payloads/
"""

from __future__ import annotations

import argparse
import base64
import json
import os
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from clipsearch.demo.scenes import random_scenes, render_png
from clipsearch.v1 import admin_pb2, admin_pb2_grpc

PROTOS = Path(__file__).resolve().parent.parent / "protos"
PROTOSET = "clipsearch.protoset"
TOP_K = 10
# Upsert ids: ghz fills in its request number, so every call writes a fresh document.
UPSERT_ID = "load-{{.RequestNumber}}"


def server_dimension(address: str, token: str | None = None, timeout: float = 30.0) -> int:
    """The embedding dimension of the model the server runs (Stats needs the admin role)."""
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(address) as channel:
        stats = admin_pb2_grpc.AdminServiceStub(channel).Stats(
            admin_pb2.StatsRequest(), timeout=timeout, metadata=metadata
        )
    return int(stats.dimension)


def texts(n: int, seed: int = 1) -> list[str]:
    """Captions of `n` generated scenes (the demo model's vocabulary)."""
    return [scene.caption for scene in random_scenes(n, seed)]


def images_b64(n: int, seed: int = 2, size: int = 64) -> list[str]:
    """Base64 PNGs of `n` generated scenes."""
    return [
        base64.b64encode(render_png(scene, size=size, seed=i)).decode("ascii")
        for i, scene in enumerate(random_scenes(n, seed))
    ]


def unit_vectors(n: int, dim: int, seed: int = 3) -> list[list[float]]:
    """`n` random L2-normalised float32 vectors of dimension `dim`."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return [[round(float(x), 6) for x in row] for row in v]


def build(dim: int, n: int = 64) -> dict[str, list[dict[str, Any]]]:
    """Every scenario's messages, keyed by the data file name the ghz configs read."""
    caps, pngs, vecs = texts(n), images_b64(n), unit_vectors(n, dim)
    return {
        "search_text.json": [{"text": t, "top_k": TOP_K} for t in caps],
        "search_vector.json": [{"vector": {"values": v}, "top_k": TOP_K} for v in vecs],
        "search_image.json": [{"image": p, "top_k": TOP_K} for p in pngs],
        "upsert.json": [
            {"documents": [{"id": UPSERT_ID, "text": t, "image": p, "metadata": {"src": "ghz"}}]}
            for t, p in zip(caps, pngs, strict=True)
        ],
    }


def write_protoset(path: Path) -> Path:
    """The API's descriptor set (with imports), which the ghz configs name as `protoset`."""
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.glob("clipsearch/v1/*.proto"))
    wkt = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTOS}", f"-I{wkt}", "--include_imports", f"-o{path}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc could not build {path.name} from {PROTOS}")
    return path


def write(out: Path, dim: int, n: int = 64) -> list[Path]:
    """Write the data files and the protoset into `out` and return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_protoset(out / PROTOSET)]
    for name, messages in build(dim, n).items():
        path = out / name
        path.write_text(json.dumps(messages))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    """Command line: write payloads for the server at --server (or --dim without one)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", help="host:port to read the dimension from")
    parser.add_argument("--dim", type=int, help="embedding dimension (instead of --server)")
    parser.add_argument("--token", default=os.environ.get("CLIPSEARCH_TOKEN"), help="bearer token")
    parser.add_argument("--out", type=Path, default=Path("payloads"))
    parser.add_argument("-n", type=int, default=64, help="messages per file")
    args = parser.parse_args(argv)
    if (args.server is None) == (args.dim is None):
        parser.error("give --server HOST:PORT or --dim N")
    dim = args.dim or server_dimension(args.server, args.token)
    for path in write(args.out, dim, args.n):
        print(path)


if __name__ == "__main__":
    main()
