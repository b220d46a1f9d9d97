#!/usr/bin/env bash
# The README's main command: set up what is missing, build, and run partita on embedded defaults.
# Today that is the inference half: load the model repository, warm the models up, print the
# READY table. Extra arguments go to `partita models`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source "${PARTITA_CACHE:-$HOME/.cache/partita}/env.sh"
# One release build of every binary (demo and benches share it: same features, one RocksDB build).
cargo build --release --locked --workspace --bins
exec "$CARGO_TARGET_DIR/release/partita" models "$@"
