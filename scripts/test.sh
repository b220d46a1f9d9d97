#!/usr/bin/env bash
# The README's test command: set up what is missing, then format check, lints, and every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source "${PARTITA_CACHE:-$HOME/.cache/partita}/env.sh"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
if [ -z "${PARTITA_SCYLLA_URI:-}" ]; then
    echo "SKIP: ScyllaDB state contract suite: PARTITA_SCYLLA_URI is not set (no ScyllaDB on this machine); RocksDB runs the same suite"
fi
cargo test --workspace --locked
