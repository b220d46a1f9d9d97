#!/usr/bin/env bash
# Run one benchmark from bench/ in release mode: scripts/bench.sh b1 [flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source "${PARTITA_CACHE:-$HOME/.cache/partita}/env.sh"
# As the image runs the node (Dockerfile); the node processes B4 and B8 start inherit it.
export MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-2}"
name="${1:?usage: scripts/bench.sh <b1|b2|b4|b5|b6|b8> [flags]}"; shift
cargo build --release --locked --workspace --bins
# B2's peer (Triton) and load tool (perf_analyzer), installed once into the cache.
if [ "$name" = b2 ]; then eval "$(bash scripts/b2-tools.sh)"; fi
exec "$CARGO_TARGET_DIR/release/$name" "$@"
