"""Generate the Python gRPC stubs from protos/ (the one pinned command: `make proto`).

Writes clipsearch/v1/*_pb2.py, *_pb2.pyi and *_pb2_grpc.py next to the shared kernel, so
that the generated imports (`from clipsearch.v1 import common_pb2`) resolve to our package.
Run with `--out DIR` to generate elsewhere (the staleness test compares the two).
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def proto_files() -> list[Path]:
    """All .proto files of the public API, sorted for a stable order."""
    return sorted((PROTO_ROOT / "clipsearch" / "v1").glob("*.proto"))


def generate(out: Path) -> None:
    """Run protoc (from the pinned grpcio-tools) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    init = out / "clipsearch" / "v1" / "__init__.py"
    init.write_text(
        '"""Generated gRPC stubs of the clipsearch.v1 API (do not edit; `make proto`)."""\n'
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT)
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
