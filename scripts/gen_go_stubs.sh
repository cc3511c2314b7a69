#!/usr/bin/env bash
# Regenerates the Go stubs of clients/go from protos/ with pinned tools: protoc from the pinned
# grpcio-tools (python -m grpc_tools.protoc), protoc-gen-go and protoc-gen-go-grpc from
# scripts/dev_tools.sh. The protos carry no go_package option, so M flags map them here.
# Usage: scripts/gen_go_stubs.sh [OUT_DIR]   (default clients/go; tests write elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-$HOME/.cache/clipsearch/venv/bin/python}"
GOBIN_DIR="$(scripts/dev_tools.sh protoc-gen-go protoc-gen-go-grpc)"
OUT="${1:-clients/go}"
MODULE=github.com/clipsearch/clipsearch/clients/go
PKG="$MODULE/clipsearchv1"
WKT="$("$PY" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')"

protos=(protos/clipsearch/v1/*.proto)
maps=()
for p in "${protos[@]}"; do
  maps+=("M${p#protos/}=$PKG")
done
go_opts=("module=$MODULE" "${maps[@]}")
mkdir -p "$OUT/clipsearchv1"
rm -f "$OUT"/clipsearchv1/*.pb.go
"$PY" -m grpc_tools.protoc -I protos -I "$WKT" \
  --plugin=protoc-gen-go="$GOBIN_DIR/protoc-gen-go" \
  --plugin=protoc-gen-go-grpc="$GOBIN_DIR/protoc-gen-go-grpc" \
  --go_out="$OUT" $(printf -- '--go_opt=%s ' "${go_opts[@]}") \
  --go-grpc_out="$OUT" $(printf -- '--go-grpc_opt=%s ' "${go_opts[@]}") \
  "${protos[@]#protos/}"
