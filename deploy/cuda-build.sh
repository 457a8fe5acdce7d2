#!/usr/bin/env bash
# Builds distillery with the `cuda` feature on a machine without a GPU or a CUDA toolkit.
#
# The CUDA 13.0 compiler, headers and link libraries come from pinned PyPI wheels
# (pip --no-deps --target, nothing system-wide); a CUDA_HOME-like folder is assembled from
# them (see /work/shared/CUDA-BUILD.md for why each step is there), then
# `cargo build --release --features cuda` runs with its own target dir so that the normal
# CPU build in target/release is never invalidated.
#
# Idempotent: the wheels are downloaded once (a marker file records the pinned set), the
# CUDA_HOME folder is re-assembled cheaply every run.
#
# Environment (all optional):
#   DISTILLERY_CUDA_PREFIX   where the wheels and CUDA_HOME go  (default: target/cuda-toolkit)
#   CARGO_TARGET_DIR         cargo target dir                     (default: target/cuda)
#   CUDA_COMPUTE_CAP         GPU compute capability, e.g. 90 (H100/H200), 80 (A100), 89 (L4)
#                                                                 (default: 90)
#   PIP                      the pip to use                       (default: python3 -m pip)
#   CARGO_BUILD_ARGS         extra arguments for cargo build      (e.g. "--bin distillery")
#   CUDA_BUILD_ONLY_TOOLKIT  =1: assemble the toolkit, print the exports, do not build
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PREFIX="${DISTILLERY_CUDA_PREFIX:-$ROOT/target/cuda-toolkit}"
WHEELS="$PREFIX/wheels"
export CUDA_HOME="$PREFIX/cuda-13.0"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/cuda}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
PIP="${PIP:-python3 -m pip}"

# Pinned: nvcc 13.0 emits PTX ISA 9.0, which a CUDA 13.0 driver (580) JIT-compiles; 13.5
# emits ISA 9.5 (rejected by that driver) and cudarc 0.19 refuses toolkits past 13.4.
# Every package is pinned and installed with --no-deps: nvidia-cuda-nvcc depends on
# unpinned crt/nvvm and would otherwise pull the newest ones.
PACKAGES=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.1.0.3
  nvidia-curand==10.4.0.35
)

log() { printf '[cuda-build] %s\n' "$*" >&2; }

# 1) The wheels.
MARKER="$WHEELS/.installed"
if [[ -f "$MARKER" && "$(cat "$MARKER")" == "${PACKAGES[*]}" && -x "$WHEELS/nvidia/cu13/bin/nvcc" ]]; then
  log "CUDA 13.0 wheels already in $WHEELS"
else
  log "installing CUDA 13.0 wheels into $WHEELS (about 1.2 GB unpacked)"
  rm -rf "$WHEELS"
  mkdir -p "$WHEELS"
  $PIP install --quiet --disable-pip-version-check --no-deps --target "$WHEELS" "${PACKAGES[@]}"
  printf '%s' "${PACKAGES[*]}" > "$MARKER"
fi
W="$WHEELS/nvidia/cu13"
for f in bin/nvcc bin/ptxas nvvm include/cuda_runtime.h include/cccl lib/libcudart.so.13 lib/libcublas.so.13; do
  [[ -e "$W/$f" ]] || { log "missing $W/$f after the wheel install"; exit 1; }
done

# 2) The CUDA_HOME folder. Directories are symlinked whole: nvcc.profile finds ../nvvm and
#    ../include relative to nvcc itself. The wheels ship only versioned sonames, so the
#    unversioned names the linker looks for (-lcudart, -lcublas, ...) are added here.
mkdir -p "$CUDA_HOME/lib64/stubs"
for d in bin include nvvm; do ln -sfn "$W/$d" "$CUDA_HOME/$d"; done
ln -sfn lib64 "$CUDA_HOME/lib"
for f in "$W"/lib/lib*.so.*; do ln -sfn "$f" "$CUDA_HOME/lib64/"; done
for l in cudart cublas cublasLt nvrtc; do ln -sfn "$W/lib/lib$l.so.13" "$CUDA_HOME/lib64/lib$l.so"; done
ln -sfn "$W/lib/libcurand.so.10" "$CUDA_HOME/lib64/libcurand.so"

export PATH="$CUDA_HOME/bin:$PATH"

# 3) A link-time stub of the driver API (libcuda.so): no wheel ships one. It is built from
#    the list of cu* functions cudarc declares, so that -lcuda resolves. It is used only for
#    linking: the binary records the soname libcuda.so.1, which the NVIDIA driver provides
#    at run time. Never ship it or put it on LD_LIBRARY_PATH.
STUB="$CUDA_HOME/lib64/stubs/libcuda.so"
if [[ ! -f "$STUB" ]]; then
  log "cargo fetch (for cudarc's symbol list)"
  cargo fetch --quiet
  REG="${CARGO_HOME:-$HOME/.cargo}/registry/src"
  CUDARC="$(ls -d "$REG"/*/cudarc-0.19.* 2>/dev/null | sort -V | tail -1)"
  [[ -n "$CUDARC" ]] || { log "cudarc 0.19 not found under $REG after cargo fetch"; exit 1; }
  log "building the libcuda link stub from $CUDARC"
  grep -ohE "pub unsafe fn cu[A-Za-z0-9_]+" "$CUDARC/src/driver/sys/mod.rs" | awk '{print $4}' | sort -u \
    | awk '{print "int " $1 "(void){return 999;}"}' > "$CUDA_HOME/lib64/stubs/libcuda_stub.c"
  ${CC:-cc} -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB" "$CUDA_HOME/lib64/stubs/libcuda_stub.c"
fi
ln -sfn stubs/libcuda.so "$CUDA_HOME/lib64/libcuda.so"

log "CUDA_HOME=$CUDA_HOME ($(nvcc --version | grep -o 'release [0-9.]*'))"
log "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP CARGO_TARGET_DIR=$CARGO_TARGET_DIR"
if [[ "${CUDA_BUILD_ONLY_TOOLKIT:-0}" == 1 ]]; then
  echo "export CUDA_HOME=$CUDA_HOME PATH=$CUDA_HOME/bin:\$PATH CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP CARGO_TARGET_DIR=$CARGO_TARGET_DIR"
  exit 0
fi

# 4) The build. A clean one takes about 13 minutes on 2 cores (candle-kernels' MoE/MMQ
#    kernels dominate); a rebuild of distillery alone takes seconds.
START=$SECONDS
# shellcheck disable=SC2086
cargo build --release --features cuda ${CARGO_BUILD_ARGS:-}
log "build took $((SECONDS - START)) s"

BIN="$CARGO_TARGET_DIR/release/distillery"
[[ -x "$BIN" ]] || { log "no binary at $BIN"; exit 1; }
NEEDED="$(readelf -d "$BIN" | grep NEEDED || true)"
echo "$NEEDED" >&2
for lib in libcublas.so libcudart.so; do
  grep -q "$lib" <<<"$NEEDED" || { log "$BIN does not link $lib: not a CUDA build?"; exit 1; }
done
log "OK: $BIN ($(du -h "$BIN" | cut -f1))"
log "run it with the CUDA 13 libraries on the loader path, e.g."
log "  LD_LIBRARY_PATH=$W/lib:\$LD_LIBRARY_PATH $BIN serve --device cuda --model DIR"
log "(libcuda.so.1 comes from the NVIDIA driver; a driver for CUDA 13.0 or newer is needed)"
echo "$BIN"
