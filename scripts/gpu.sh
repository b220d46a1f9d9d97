#!/usr/bin/env bash
# A GPU check in two halves, for a lent machine that has PyTorch but no Rust toolchain.
#
#   scripts/gpu.sh pack       here: build `partita` and `b1` in release with LibTorch's CUDA half
#                             linked (feature `cuda`), strip them, and pack them with the model
#                             repository into gpu/bundle.tar.xz (a few MB).
#   scripts/gpu.sh run OUT    there, from the repository root with gpu/ carried: unpack, point the
#                             binaries at that machine's LibTorch (the one its `torch` package
#                             ships), check that every symbol resolves, then write to OUT:
#                             - `partita models --device cuda` (load and warm up the models);
#                             - B1 on the GPU (bare forward loop, pool, open loop);
#                             - B1 on its CPU, for the ratio.
#
# Each step's output goes to OUT/<step>.txt. A step that fails says so, and the next one still
# runs. The binaries were built against this machine's LibTorch (torch 2.13). A machine with
# another version may lack symbols they use: the `symbols` step lists them.
set -euo pipefail
cd "$(dirname "$0")/.."

pack() {
    bash scripts/setup.sh
    # shellcheck disable=SC1091
    source "${PARTITA_CACHE:-$HOME/.cache/partita}/env.sh"
    cargo build --release --locked -p partita-runtime --features partita-runtime/cuda --bin partita
    cargo build --release --locked -p partita-bench --features partita-bench/cuda --bin b1
    rm -rf gpu && mkdir -p gpu/stage/bin
    for b in partita b1; do
        strip -o "gpu/stage/bin/$b" "$CARGO_TARGET_DIR/release/$b"
        if ! readelf -d "gpu/stage/bin/$b" | grep -q 'libtorch.so'; then
            echo "gpu.sh: $b does not link libtorch.so (LibTorch's CUDA half): not packed" >&2
            exit 1
        fi
    done
    cp -r models gpu/stage/models
    tar -C gpu/stage -cJf gpu/bundle.tar.xz bin models
    rm -rf gpu/stage
    ls -l gpu/bundle.tar.xz
}

step() {
    local name="$1"
    shift
    echo "== $name: $*"
    if "$@" >"$out/$name.txt" 2>&1; then
        echo "   ok ($(tail -n 1 "$out/$name.txt" | cut -c1-160))"
    else
        echo "   FAILED with status $? (see $name.txt)"
    fi
}

run() {
    out="${1:?usage: scripts/gpu.sh run OUT}"
    mkdir -p "$out"
    local dir
    dir=$(mktemp -d)
    tar -C "$dir" -xJf gpu/bundle.tar.xz
    local torch_lib
    torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    step machine sh -c 'nvidia-smi; python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())"; nproc'
    # Every symbol the binaries need, resolved against this machine's LibTorch.
    step symbols sh -c "ldd -r '$dir/bin/partita' | grep -E 'undefined|not found' && exit 1 || echo 'every symbol resolves'"
    step models "$dir/bin/partita" models --repository "$dir/models" --device cuda
    step b1_cuda "$dir/bin/b1" --repository "$dir/models" --device cuda --runs 3
    step b1_cpu "$dir/bin/b1" --repository "$dir/models" --device cpu --runs 3
}

case "${1:-}" in
    pack) pack ;;
    run) shift; run "$@" ;;
    *) echo "usage: scripts/gpu.sh pack | scripts/gpu.sh run OUT" >&2; exit 2 ;;
esac
