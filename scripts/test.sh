#!/usr/bin/env bash
# The README's test command: set up what is missing, then format check, lints, every test, and
# the Helm chart's offline validation.
# Prints each phase's duration. The tests start their own Apache Kafka and Cassandra processes
# (jars fetched by setup); a server that cannot start fails its tests, nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
total=$(date +%s)
phase() {
    local name="$1" t
    shift
    t=$(date +%s)
    "$@"
    echo "[test] $name: $(( $(date +%s) - t )) s" >&2
}
phase setup bash scripts/setup.sh
# shellcheck disable=SC1091
source "${PARTITA_CACHE:-$HOME/.cache/partita}/env.sh"
# Each checkout path gets its own test executables in the shared target dir: drop those nobody
# rebuilt for two days (other clones' leftovers), so the disk cannot fill up.
find "$CARGO_TARGET_DIR/debug/deps" -maxdepth 1 -type f -perm -u+x ! -name '*.*' -mtime +2 -delete 2>/dev/null || true
phase fmt cargo fmt --all -- --check
# The crash tests need the fail points (`FAILPOINTS=...`), built in only with this feature.
features=(--features partita-runtime/failpoints)
phase clippy cargo clippy --workspace --all-targets --locked "${features[@]}" -- -D warnings
phase build cargo test --workspace --locked "${features[@]}" --no-run
phase tests cargo test --workspace --locked "${features[@]}"
# The Helm chart rendered and validated offline; check-config runs the binary built above.
phase chart bash scripts/chart/check.sh
echo "[test] total: $(( $(date +%s) - total )) s" >&2
