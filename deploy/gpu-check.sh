#!/usr/bin/env bash
# The GPU checks of the CUDA build, for a session that has a GPU machine lent (the `device`
# tool: no Rust there, nothing fetched, at most 64 MiB carried per call).
#
#   here:   deploy/gpu-check.sh pack
#             builds the cuda binaries (deploy/cuda-build.sh), strips and xz-packs them with
#             the test models into two bundles under target/gpu-check/ (ignored by git):
#               parity/  the lib tests (CUDA ops vs CPU ops, device argmax), the model parity
#                        tests, tiny-random-qwen2 + tiny-llama-v512 (Qwen2 and Llama paths)
#               serve/   distillery, distillery-loadtest, the customer-service scenario and
#                        a Qwen2 tokenizer for gen-model
#   device: run(carry=["target/gpu-check/parity"], command="deploy/gpu-check.sh run parity",
#               timeout_s=300)                                   about 2-3 minutes
#   device: run(carry=["target/gpu-check/serve"],  command="deploy/gpu-check.sh run serve",
#               timeout_s=480)  right after, on the warm machine: about 4-5 minutes
#
# run parity: the CUDA operator tests, then the model parity tests on cuda in f32 (greedy ids
#             identical to the goldens, logits within 1e-3) and bf16 (first 8 ids, see
#             tests/model_parity.rs for the near-tie rule).
# run serve:  gen-model r1-distill-qwen-1.5b, the daemon on cuda (bf16, KV pool from
#             --gpu-memory-utilization), distillery-loadtest customer-service at concurrency
#             64, 256 and 1024 (30 s each after a 5 s warm-up); req/s and output tok/s land in
#             $OUT/summary.txt and $OUT/cs-<C>.json.
# Logs go to $OUT (the device tool brings them back) or ./gpu-check-out when OUT is unset.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUNDLES="$ROOT/target/gpu-check"
SHARED_MODELS="${DISTILLERY_SHARED_MODELS:-$ROOT/../shared/models}"
OUT="${OUT:-$ROOT/gpu-check-out}"
LOADTEST_SECONDS="${LOADTEST_SECONDS:-30}"
CONCURRENCIES="${CONCURRENCIES:-64 256 1024}"
log() { printf '[gpu-check %(%H:%M:%S)T] %s\n' -1 "$*" | tee -a "$OUT/summary.txt" >&2; }

pack() {
  mkdir -p "$OUT"
  rm -rf "$BUNDLES"
  mkdir -p "$BUNDLES/parity" "$BUNDLES/serve"
  CARGO_BUILD_ARGS="--bin distillery" bash deploy/cuda-build.sh >/dev/null
  # shellcheck disable=SC1090
  . <(CUDA_BUILD_ONLY_TOOLKIT=1 bash deploy/cuda-build.sh 2>/dev/null | grep '^export')
  local stage
  stage="$(mktemp -d)"
  trap 'rm -rf "$stage"' RETURN
  # Test binaries: cargo names them by hash; its JSON messages say which is which.
  cargo test --release --features cuda --lib --test model_parity --no-run \
    --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do
    cp "$exe" "$stage/$name-tests"
  done
  [[ -x "$stage/distillery-tests" && -x "$stage/model_parity-tests" ]] \
    || { echo "test binaries missing" >&2; exit 1; }
  strip "$stage"/*-tests
  mkdir -p "$stage/models"
  for m in tiny-random-qwen2 tiny-llama-v512; do cp -r "$SHARED_MODELS/$m" "$stage/models/"; done
  tar -C "$stage" -cf - distillery-tests model_parity-tests models | xz -6 -T0 > "$BUNDLES/parity/bundle.tar.xz"
  rm -rf "$stage"/*

  # The daemon (CUDA) and the load generator (plain CPU build).
  cargo build --release -p distillery-loadtest --quiet
  cp "$CARGO_TARGET_DIR/release/distillery" "$stage/distillery"
  cp "$ROOT/target/release/distillery-loadtest" "$stage/distillery-loadtest"
  strip "$stage/distillery" "$stage/distillery-loadtest"
  mkdir -p "$stage/tokenizer"
  for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json; do
    cp "$SHARED_MODELS/tiny-random-qwen2/$f" "$stage/tokenizer/"
  done
  cp loadtest/scenarios/customer-service.toml "$stage/"
  tar -C "$stage" -cf - . | xz -6 -T0 > "$BUNDLES/serve/bundle.tar.xz"
  du -b "$BUNDLES"/*/bundle.tar.xz >&2
  for b in "$BUNDLES"/*/bundle.tar.xz; do
    (( $(stat -c %s "$b") < 60 * 1024 * 1024 )) || { echo "$b is over the 64 MiB carry limit" >&2; exit 1; }
  done
  echo "packed: carry target/gpu-check/parity, then target/gpu-check/serve" >&2
}

unpack() {
  local bundle="$BUNDLES/$1/bundle.tar.xz" dest="/tmp/gpu-check-$1"
  [[ -f "$bundle" ]] || { log "no $bundle: run 'deploy/gpu-check.sh pack' here and carry target/gpu-check/$1"; exit 1; }
  rm -rf "$dest" && mkdir -p "$dest"
  if command -v xz >/dev/null; then
    xz -dc "$bundle" | tar -C "$dest" -xf -
  else
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$bundle" "$dest"
  fi
  echo "$dest"
}

# The CUDA 13 runtime libraries: the torch cu130 venv's nvidia/cu13/lib (libcudart.so.13,
# libcublas.so.13, libcurand.so.10); libcuda.so.1 is the driver's.
cuda_libs() {
  local dir
  dir="$(python3 - <<'PY' 2>/dev/null || true
import os, nvidia
for p in nvidia.__path__:
    d = os.path.join(p, "cu13", "lib")
    if os.path.isdir(d):
        print(d); break
PY
)"
  [[ -n "$dir" ]] || dir="$(ls -d /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -1)"
  [[ -n "$dir" ]] || { log "no nvidia/cu13/lib found (CUDA 13 wheels)"; exit 1; }
  export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt" >&2 || true
}

run_parity() {
  local b status=0
  b="$(unpack parity)"
  cuda_libs
  export DISTILLERY_MODELS_DIR="$b/models" DISTILLERY_TEST_DEVICE=cuda RUST_BACKTRACE=1
  log "CUDA ops vs CPU ops (f32, bf16, f16), device argmax"
  "$b/distillery-tests" model::cuda --test-threads 1 2>&1 | tee "$OUT/cuda-ops.log" | tail -20 || status=1
  for dtype in f32 bf16; do
    log "model parity on cuda, $dtype"
    DISTILLERY_TEST_DTYPE=$dtype "$b/model_parity-tests" --test-threads 2 --nocapture \
      >"$OUT/parity-$dtype.log" 2>&1 || status=1
    grep -E "^test |test result|near-tie|panicked|differ" "$OUT/parity-$dtype.log" | tee -a "$OUT/summary.txt" >&2 || true
  done
  log "parity done, status $status"
  return $status
}

run_serve() {
  local b model=/tmp/r1-distill-qwen-1.5b port=8000 pid status=0
  b="$(unpack serve)"
  cuda_libs
  log "gen-model r1-distill-qwen-1.5b"
  "$b/distillery" gen-model --preset r1-distill-qwen-1.5b --out "$model" --force \
    --tokenizer-from "$b/tokenizer" 2>&1 | tail -1 | tee -a "$OUT/summary.txt" >&2
  log "daemon on cuda"
  "$b/distillery" serve --model "$model" --device cuda --port $port --log-format json \
    --max-num-seqs 512 --max-num-batched-tokens 8192 --max-waiting-requests 4096 \
    >"$OUT/daemon.log" 2>&1 &
  pid=$!
  trap 'kill $pid 2>/dev/null || true' EXIT
  for _ in $(seq 1 300); do
    if curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1; then break; fi
    kill -0 $pid 2>/dev/null || { log "daemon exited:"; tail -20 "$OUT/daemon.log" >&2; return 1; }
    sleep 1
  done
  grep -E "KV pool|KV cache allocated|model loaded" "$OUT/daemon.log" | tee -a "$OUT/summary.txt" >&2 || true
  # One request first: the PTX JIT of candle's kernels happens here, not in a measurement.
  curl -sf "http://127.0.0.1:$port/v1/completions" -H 'content-type: application/json' \
    -d '{"model":"r1-distill-qwen-1.5b","prompt":"Hello","max_tokens":4}' | tee -a "$OUT/summary.txt" >&2 \
    || { log "first request failed"; tail -20 "$OUT/daemon.log" >&2; return 1; }
  echo >&2
  for c in $CONCURRENCIES; do
    log "loadtest customer-service, concurrency $c, ${LOADTEST_SECONDS}s"
    "$b/distillery-loadtest" --scenario "$b/customer-service.toml" --url "http://127.0.0.1:$port" \
      --concurrency "$c" --duration "${LOADTEST_SECONDS}s" --warmup 5s --threads 4 \
      --output "$OUT/cs-$c.json" --summary-only >"$OUT/cs-$c.txt" 2>&1 || status=1
    grep -E "Successful|Failed|Request throughput|Output token throughput|TTFT|TPOT" "$OUT/cs-$c.txt" \
      | tee -a "$OUT/summary.txt" >&2 || true
  done
  kill -TERM $pid 2>/dev/null || true
  wait $pid 2>/dev/null || true
  log "serve done, status $status"
  return $status
}

mkdir -p "$OUT"
case "${1:-}" in
  pack) pack ;;
  run)
    case "${2:-}" in
      parity) run_parity ;;
      serve) run_serve ;;
      *) echo "usage: $0 run parity|serve" >&2; exit 2 ;;
    esac
    ;;
  *) echo "usage: $0 pack | run parity | run serve" >&2; exit 2 ;;
esac
