#!/usr/bin/env bash
# Builds the peer of the CPU quantization benchmarks, llama.cpp's llama-server and
# llama-quantize, outside the repository, from the llama.cpp sources vendored in the
# llama-cpp-python sdist on PyPI (package registries only: no git clone).
#
#   bash loadtest/build_llama_server.sh [DIR]      # default DIR: /tmp/llama-peer
#
# Leaves DIR/bin/{llama-server,llama-quantize} and DIR/src/convert_hf_to_gguf.py (with its
# `gguf` package from the same sources on PYTHONPATH: DIR/src/gguf-py). Native CPU flags
# (GGML_NATIVE), as a user building it on the machine would; CURL off (no downloads).
set -euo pipefail
dir=${1:-/tmp/llama-peer}
mkdir -p "$dir"
cd "$dir"
python3 -m pip install -q cmake
if [ ! -d src ]; then
  # The sdist file itself, from PyPI's JSON API: `pip download --no-binary` would also build
  # its metadata, which compiles the build backend's dependencies from source.
  mkdir -p sdist
  python3 - <<'PY'
import json, urllib.parse, urllib.request
api = "https://pypi.org/pypi/llama-cpp-python/json"
meta = json.load(urllib.request.urlopen(api))
(sdist,) = [f for f in meta["urls"] if f["packagetype"] == "sdist"]
# Mirrors of PyPI answer with addresses relative to the API's.
urllib.request.urlretrieve(urllib.parse.urljoin(api, sdist["url"]), "sdist/" + sdist["filename"])
print("llama-cpp-python", meta["info"]["version"], sdist["filename"])
PY
  tar xzf sdist/llama_cpp_python-*.tar.gz
  mv llama_cpp_python-*/vendor/llama.cpp src
fi
# On CPUs with AMX (Sapphire Rapids and later), -march=native compiles ggml's AMX matmul,
# which segfaulted in ggml_backend_amx_mul_mat on the first decode of a Q4_K_M file in this
# workplace's VMs (0.3.36's sources; the kernel grants the tile state); without it llama.cpp
# takes its AVX-512 VNNI repacked kernels, what such a user would fall back to.
no_amx=""
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
  no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
cmake -S src -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
cmake --build build -j"$(nproc)" --target llama-server llama-quantize
mkdir -p bin
cp build/bin/llama-server build/bin/llama-quantize bin/
echo "built: $dir/bin/llama-server $dir/bin/llama-quantize ($(ls sdist))"
