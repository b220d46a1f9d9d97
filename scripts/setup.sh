#!/usr/bin/env bash
# Idempotent setup for partita: Debian packages, LibTorch (PyPI torch in a cached virtualenv),
# the Apache Kafka and Apache Cassandra server jars from Maven Central (pinned in
# scripts/jars/*/pom.xml), the Helm chart's validation tools (scripts/chart/tools.sh), and a
# shared cargo target directory.
#
# Everything lives in $PARTITA_CACHE (default ~/.cache/partita), outside the checkout, so a fresh
# clone on the same machine reuses it. A second run takes seconds.
#
# Usage:  source <(scripts/setup.sh --print-env)   # just the environment
#         scripts/setup.sh                          # install what is missing, then write env.sh
set -euo pipefail

CACHE="${PARTITA_CACHE:-$HOME/.cache/partita}"
TORCH_VERSION="2.13.0"
VENV="$CACHE/venv"
TOOLS="$CACHE/tools"
JARS="$CACHE/jars"
HERE="$(cd "$(dirname "$0")" && pwd)"

log() { printf '[setup] %s\n' "$*" >&2; }

print_env() {
    local torch_lib="$VENV/lib/python3.11/site-packages/torch/lib"
    if [ -x "$VENV/bin/python" ]; then
        torch_lib="$("$VENV/bin/python" -c 'import os,torch;print(os.path.join(os.path.dirname(torch.__file__),"lib"))' 2>/dev/null || echo "$torch_lib")"
    fi
    cat <<ENV
export PARTITA_CACHE="$CACHE"
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$TOOLS/bin:\$PATH"
export LIBTORCH_USE_PYTORCH=1
export LIBTORCH_BYPASS_VERSION_CHECK=1
export LD_LIBRARY_PATH="$torch_lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export CARGO_TARGET_DIR="\${CARGO_TARGET_DIR:-$CACHE/target}"
export PARTITA_JARS="$JARS"
ENV
}

if [ "${1:-}" = "--print-env" ]; then
    print_env
    exit 0
fi

mkdir -p "$CACHE" "$TOOLS"
start=$(date +%s)

# 1. Debian packages the native builds need (rocksdb: clang; rdkafka: cmake; prost: protoc).
#    Benchmarks compare against rocksdb-tools (db_bench) and redis-server; a pipeline test
#    produces a header name that is not UTF-8 with kcat (Rust's Kafka clients cannot).
APT_PKGS=(build-essential cmake pkg-config clang libclang-dev protobuf-compiler libprotobuf-dev
          libssl-dev libsasl2-dev zlib1g-dev libzstd-dev libcurl4-openssl-dev python3-venv
          rocksdb-tools redis-server kcat)
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. LibTorch from the PyPI torch wheel, in a virtualenv kept in the cache (and tritonclient).
if ! "$VENV/bin/python" -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' else 1)" 2>/dev/null; then
    log "installing torch==$TORCH_VERSION into $VENV (large download, once)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" numpy
fi
# Triton's gRPC client: the Open Inference Protocol tests call partita's endpoint with it.
TRITONCLIENT_VERSION="2.73.0"
if ! "$VENV/bin/python" -c "import importlib.metadata as m,sys; import tritonclient.grpc; sys.exit(0 if m.version('tritonclient')=='$TRITONCLIENT_VERSION' else 1)" 2>/dev/null; then
    log "installing tritonclient[grpc]==$TRITONCLIENT_VERSION into $VENV"
    "$VENV/bin/pip" install -q "tritonclient[grpc]==$TRITONCLIENT_VERSION"
fi

# 3. The Kafka and Cassandra servers as plain jars (Maven Central), and the small launcher that
#    ties each server's life to the process that started it. Redone only when a POM changes.
# Java 17 and Maven: Debian's packages when the commands are missing (machines that come with
# their own JDK keep it).
need_java() {
    command -v "$1" >/dev/null && return
    local pkg="openjdk-17-jdk-headless"
    [ "$1" = mvn ] && pkg="maven"
    log "$1 not found: installing Debian's $pkg"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
}
for server in kafka cassandra; do
    pom="$HERE/jars/$server/pom.xml"
    stamp="$(sha256sum "$pom" | cut -c1-16)"
    if [ "$(cat "$JARS/$server/.stamp" 2>/dev/null)" != "$stamp" ]; then
        need_java javac
        need_java mvn
        log "fetching the $server server jars from Maven Central ($pom)"
        rm -rf "$JARS/$server"
        mvn -q -B -Dmaven.repo.local="$CACHE/m2" -f "$pom" \
            org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
            -DincludeScope=runtime -DoutputDirectory="$JARS/$server"
        echo "$stamp" > "$JARS/$server/.stamp"
    fi
done
launcher="$HERE/jars/ParentWatch.java"
stamp="$(sha256sum "$launcher" | cut -c1-16)"
if [ "$(cat "$JARS/launcher/.stamp" 2>/dev/null)" != "$stamp" ]; then
    need_java javac
    rm -rf "$JARS/launcher"
    javac -d "$JARS/launcher" "$launcher"
    echo "$stamp" > "$JARS/launcher/.stamp"
fi
rm -rf "$TOOLS/bin/nisshi" "$CACHE/nisshi-build" # the Kafka-protocol stand-in used before

# 4. The Helm chart's offline checks: helm (built from its Go module), kubernetes-validate and
#    checkov (PyPI), the operators' CRDs (Go modules, Maven Central).
need_java mvn
PARTITA_CACHE="$CACHE" bash "$HERE/chart/tools.sh"

print_env > "$CACHE/env.sh"
log "ready in $(( $(date +%s) - start ))s; environment in $CACHE/env.sh"
