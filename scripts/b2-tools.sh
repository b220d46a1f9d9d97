#!/usr/bin/env bash
# B2's peer and load tool, installed once into $PARTITA_CACHE/b2 (not needed by the tests):
#   - Triton: tritonserver 2.51 from the PyPI nvidia-pytriton wheel, in a virtualenv of its own;
#     the wheel ships only Triton's python backend, so the model runs there through the torch of
#     partita's virtualenv (a .pth file), on CPU.
#   - perf_analyzer 2.51 (Triton's load tool): the PyPI perf-analyzer package is a placeholder and
#     tritonclient dropped the binary after 2.60 (2.52-2.60 need glibc 2.38), so it comes from the
#     tritonclient 2.51.0 wheel, with the two libraries it links that Debian 12 lacks: libcudart.so.12
#     (the nvidia-cuda-runtime-cu12 wheel; no driver needed) and libb64.so.0d (Debian's libb64-0d).
# Prints the environment B2 reads (PARTITA_B2_TRITON, PARTITA_B2_PERF_ANALYZER, PARTITA_B2_LD_PATH).
set -euo pipefail
CACHE="${PARTITA_CACHE:-$HOME/.cache/partita}"
B2="$CACHE/b2"
VENV="$CACHE/venv"
PYTRITON_VERSION="0.7.0"
TRITONCLIENT_VERSION="2.51.0"
log() { printf '[b2-tools] %s\n' "$*" >&2; }
mkdir -p "$B2"
PY="$(readlink -f "$VENV/bin/python")"
SITE="$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
LIBDIR="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')"

PA="$B2/perf_analyzer"
if [ "$(cat "$PA/.stamp" 2>/dev/null)" != "$TRITONCLIENT_VERSION" ]; then
    log "perf_analyzer from tritonclient==$TRITONCLIENT_VERSION (+ libcudart, libb64)"
    rm -rf "$PA" && mkdir -p "$PA/lib" "$PA/tmp"
    (
        cd "$PA/tmp"
        "$VENV/bin/pip" download -q "tritonclient==$TRITONCLIENT_VERSION" --no-deps --only-binary=:all: -d .
        "$VENV/bin/pip" download -q "nvidia-cuda-runtime-cu12" --no-deps --only-binary=:all: -d .
        apt-get download libb64-0d >/dev/null 2>&1
        "$PY" -m zipfile -e tritonclient-*.whl tc
        "$PY" -m zipfile -e nvidia_cuda_runtime_cu12-*.whl cu
        dpkg -x libb64-0d_*.deb deb
        cp tc/*.data/data/bin/perf_analyzer "$PA/" && chmod +x "$PA/perf_analyzer"
        cp cu/nvidia/cuda_runtime/lib/libcudart.so.12 "$PA/lib/"
        cp deb/usr/lib/x86_64-linux-gnu/libb64.so.0d "$PA/lib/"
    )
    rm -rf "$PA/tmp"
    echo "$TRITONCLIENT_VERSION" > "$PA/.stamp"
fi

TV="$B2/pytriton"
if [ "$(cat "$TV/.stamp" 2>/dev/null)" != "$PYTRITON_VERSION" ]; then
    log "tritonserver from nvidia-pytriton==$PYTRITON_VERSION (a virtualenv of its own, ~370 MB)"
    rm -rf "$TV"
    "$PY" -m venv "$TV"
    "$TV/bin/pip" install -q "nvidia-pytriton==$PYTRITON_VERSION"
    # torch from partita's virtualenv, read-only, last on the path (pytriton pins numpy < 2).
    echo "$SITE" > "$TV/lib/python3.11/site-packages/zz_partita_torch.pth"
    T="$TV/lib/python3.11/site-packages/pytriton/tritonserver"
    cp "$T/python_backend_stubs/3.11/triton_python_backend_stub" "$T/backends/python/"
    echo "$PYTRITON_VERSION" > "$TV/.stamp"
fi

T="$TV/lib/python3.11/site-packages/pytriton/tritonserver"
cat <<ENV
export PARTITA_B2_TRITON="$T"
export PARTITA_B2_TRITON_SITE="$TV/lib/python3.11/site-packages:$SITE"
export PARTITA_B2_PERF_ANALYZER="$PA/perf_analyzer"
export PARTITA_B2_PA_LIB="$PA/lib"
export PARTITA_B2_PYTHON_LIB="$LIBDIR"
ENV
