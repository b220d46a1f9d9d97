#!/usr/bin/env bash
# The README's main command: set up what is missing, build, and run `partita demo` on embedded
# defaults (Apache Kafka on loopback, one node with RocksDB state and the shipped model, the load
# generator, a results table). Extra arguments go to `partita demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source "${PARTITA_CACHE:-$HOME/.cache/partita}/env.sh"
# One release build of every binary (demo and benches share it: same features, one RocksDB build).
cargo build --release --locked --workspace --bins
exec "$CARGO_TARGET_DIR/release/partita" demo "$@"
