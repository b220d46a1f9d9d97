#!/usr/bin/env bash
# The Helm chart, checked offline (a phase of scripts/test.sh; tools from scripts/chart/tools.sh):
#   helm lint --strict, then for the default values and each deploy/partita/ci/*-values.yaml:
#   helm template (Kubernetes 1.33), scripts/chart/validate.py (strict schemas of every object,
#   probes on the port the config serves, termination grace), `partita check-config` on each
#   scorer and worker StatefulSet's rendered configuration and environment; and checkov over all of it, with
#   the exceptions in scripts/chart/checkov-skips.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck disable=SC1091
source "${PARTITA_CACHE:-$HOME/.cache/partita}/env.sh"
HELM="$PARTITA_CACHE/tools/bin/helm"
VENV="$PARTITA_CACHE/k8s-venv"
PARTITA="${PARTITA_BIN:-$CARGO_TARGET_DIR/debug/partita}"
K8S=1.33.0
chart=deploy/partita
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

mkdir -p "$out/rendered"
for values in "" "$chart"/ci/*-values.yaml; do
    name="$(basename "${values:-default}" -values.yaml)"
    args=(--namespace partita --kube-version "$K8S")
    [ -n "$values" ] && args+=(-f "$values")
    "$HELM" lint --strict --quiet "$chart" "${args[@]}"
    "$HELM" template partita "$chart" "${args[@]}" > "$out/rendered/$name.yaml"
    "$VENV/bin/python" scripts/chart/validate.py --k8s "$K8S" --crds "$PARTITA_CACHE/crds" \
        --out "$out/$name" "$out/rendered/$name.yaml"
    for toml in "$out/$name"/*.toml; do
        mapfile -t env < "${toml%.toml}.env"
        if ! report="$(env -i PATH="$PATH" LD_LIBRARY_PATH="$LD_LIBRARY_PATH" "${env[@]}" \
                "$PARTITA" check-config --config "$toml" 2>&1)"; then
            echo "$report" >&2
            echo "partita check-config refused $(basename "$toml") ($name values)" >&2
            exit 1
        fi
        echo "$(basename "$toml" .toml) ($name): $(head -1 <<<"$report")"
    done
done
skips="$(grep -v '^#' scripts/chart/checkov-skips.txt | cut -d' ' -f1 | paste -sd, -)"
"$VENV/bin/checkov" -d "$out/rendered" --framework kubernetes --skip-download --quiet --compact \
    --skip-check "$skips"
