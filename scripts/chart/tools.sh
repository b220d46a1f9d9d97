#!/usr/bin/env bash
# The chart's offline validation tools, in $PARTITA_CACHE (called by scripts/setup.sh):
#   - helm (Go module helm.sh/helm/v3, built once; `helm template` defaults to Kubernetes 1.33),
#   - a virtualenv with kubernetes-validate (Kubernetes' OpenAPI schemas per version) and checkov,
#   - the operators' CRDs: KEDA, Prometheus Operator, Scylla Operator from their Go
#     modules; Strimzi's generated from its API jars (Maven Central).
# Each part is redone only when its pinned versions (the stamp) change.
set -euo pipefail
CACHE="${PARTITA_CACHE:-$HOME/.cache/partita}"
HERE="$(cd "$(dirname "$0")" && pwd)"
TOOLS="$CACHE/tools"
HELM_VERSION=v3.22.0
K8S_MINOR=33
KV_VERSION=1.37.0
CHECKOV_VERSION=3.3.30
CRD_MODULES=(
    "github.com/kedacore/keda/v2@v2.21.0 config/crd/bases/keda.sh_scaledobjects.yaml config/crd/bases/keda.sh_triggerauthentications.yaml"
    "github.com/prometheus-operator/prometheus-operator@v0.85.0 example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml"
    "github.com/scylladb/scylla-operator@v1.14.0 pkg/api/scylla/v1/scylla.scylladb.com_scyllaclusters.yaml"
)
log() { printf '[setup] %s\n' "$*" >&2; }
mkdir -p "$TOOLS/bin"
export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOPATH="$CACHE/go" GOFLAGS=-mod=mod

stamp_ok() { [ "$(cat "$1" 2>/dev/null)" = "$2" ]; }

# helm, built from its Go module (no prebuilt binary is served by the registries here).
stamp="$HELM_VERSION k8s1.$K8S_MINOR"
if ! stamp_ok "$TOOLS/helm.stamp" "$stamp" || [ ! -x "$TOOLS/bin/helm" ]; then
    command -v go >/dev/null || PATH="/usr/local/go/bin:$PATH"
    log "building helm $HELM_VERSION from its Go module (once, a few minutes)"
    v=helm.sh/helm/v3
    GOBIN="$TOOLS/bin" go install -ldflags "-s -w -X $v/internal/version.version=$HELM_VERSION \
        -X $v/pkg/chartutil.k8sVersionMajor=1 -X $v/pkg/chartutil.k8sVersionMinor=$K8S_MINOR \
        -X $v/pkg/lint/rules.k8sVersionMajor=1 -X $v/pkg/lint/rules.k8sVersionMinor=$K8S_MINOR" \
        "$v/cmd/helm@$HELM_VERSION" 2> >(grep -v '^go: downloading' >&2)
    echo "$stamp" > "$TOOLS/helm.stamp"
fi

# kubernetes-validate and checkov.
VENV="$CACHE/k8s-venv"
stamp="kubernetes-validate==$KV_VERSION checkov==$CHECKOV_VERSION"
if ! stamp_ok "$VENV/.stamp" "$stamp"; then
    log "installing $stamp into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q $stamp
    echo "$stamp" > "$VENV/.stamp"
fi

# CRDs.
CRDS="$CACHE/crds"
stamp="$(printf '%s\n' "${CRD_MODULES[@]}" | cat - "$HERE/strimzi/pom.xml" | sha256sum | cut -c1-16)"
if ! stamp_ok "$CRDS/.stamp" "$stamp"; then
    command -v go >/dev/null || PATH="/usr/local/go/bin:$PATH"
    log "fetching the operators' CRDs (Go modules, Maven Central)"
    rm -rf "$CRDS" && mkdir -p "$CRDS"
    for entry in "${CRD_MODULES[@]}"; do
        read -r module files <<<"$entry"
        zip="$(go mod download -json "$module" 2>/dev/null | python3 -c 'import json,sys;print(json.load(sys.stdin)["Zip"])')"
        for f in $files; do
            unzip -q -o -j -d "$CRDS" "$zip" "$module/$f"
        done
    done
    mvn -q -B -Dstyle.color=never -Dmaven.repo.local="$CACHE/m2" -f "$HERE/strimzi/pom.xml" \
        org.apache.maven.plugins:maven-dependency-plugin:3.8.1:build-classpath -Dmdep.outputFile="$CRDS/strimzi.cp"
    gen() { java -cp "$(cat "$CRDS/strimzi.cp")" io.strimzi.crdgenerator.CrdGenerator --label app:strimzi \
        --target-kube 1.16+ --crd-api-version v1 --storage-version v1beta2 --yaml "$@"; }
    gen --api-versions v1beta2 \
        io.strimzi.api.kafka.model.kafka.Kafka="$CRDS/strimzi-kafka.yaml" \
        io.strimzi.api.kafka.model.nodepool.KafkaNodePool="$CRDS/strimzi-kafkanodepool.yaml" \
        io.strimzi.api.kafka.model.user.KafkaUser="$CRDS/strimzi-kafkauser.yaml" \
        io.strimzi.api.kafka.model.topic.KafkaTopic="$CRDS/strimzi-kafkatopic.yaml" >/dev/null 2>&1
    rm "$CRDS/strimzi.cp"
    echo "$stamp" > "$CRDS/.stamp"
fi
