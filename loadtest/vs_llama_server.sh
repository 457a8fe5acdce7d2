#!/usr/bin/env bash
# Paired runs, Distillery against llama.cpp's llama-server, on the same GGUF files, under the
# same distillery-loadtest scenario, alternating in the same minutes (issue 20's figures).
#
#   bash loadtest/vs_llama_server.sh MODEL_DIR [FORMATS] [CONCURRENCIES] [DURATION] [ROUNDS]
#     MODEL_DIR      a Qwen2 folder, e.g. from `distillery gen-model --preset qwen2.5-0.5b`
#     FORMATS        llama-quantize types, default "Q8_0 Q4_K_M"
#     CONCURRENCIES  default "1 16 64"
#     DURATION       measured seconds per run, default 40s (plus a 5 s warm-up)
#     ROUNDS         runs per server and point, default 2 (the order flips each round)
#   TIMEOUT (env)    per-request limit, default 600s: at c=64 a 1.5B model's request takes
#                    minutes on two cores, and one cut short would count as a failure
#   REQUESTS (env)   measure exactly this many requests instead of DURATION, no warm-up:
#                    REQUESTS=64 at c=64 is one wave of 64 requests in flight together, for a
#                    model whose wave outlasts any affordable window (1.5B on two cores)
#
# Needs `bash loadtest/build_llama_server.sh` first (PEER, default /tmp/llama-peer) and
# `cargo build --release --workspace`. Writes MODEL_DIR/model-bf16.gguf (loadtest/hf_to_gguf.py)
# and MODEL_DIR/model-FORMAT.gguf (llama-quantize) once; both servers load the same file, so
# their weights are the same bytes. Both get every core: llama-server `-t $(nproc)` with a slot
# per request in flight, Distillery with no flags besides --model. One line per run on stdout
# (and a JSON summary per run under MODEL_DIR/vs/).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
model=$(cd "$1" && pwd)
formats=${2:-Q8_0 Q4_K_M}
concurrencies=${3:-1 16 64}
duration=${4:-40s}
rounds=${5:-2}
peer=${PEER:-/tmp/llama-peer}
scenario=${SCENARIO:-$here/loadtest/scenarios/compute-bound.toml}
timeout=${TIMEOUT:-600s}
if [ -n "${REQUESTS:-}" ]; then
  window=(--num-requests "$REQUESTS" --warmup 0s)
else
  window=(--duration "$duration" --warmup 5s)
fi
distillery=$here/target/release/distillery
loadtest=$here/target/release/distillery-loadtest
mkdir -p "$model/vs"

if [ ! -f "$model/model-bf16.gguf" ]; then
  python3 "$here/loadtest/hf_to_gguf.py" "$model" "$model/model-bf16.gguf"
fi
for f in $formats; do
  if [ ! -f "$model/model-$f.gguf" ]; then
    "$peer/bin/llama-quantize" "$model/model-bf16.gguf" "$model/model-$f.gguf" "$f" "$(nproc)" \
      >"$model/vs/quantize-$f.log" 2>&1
  fi
done

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# Waits until URL/v1/models answers (the model is loaded), or the server process died.
wait_ready() {
  local url=$1 pid=$2
  for _ in $(seq 1 1200); do
    curl -sf "$url/v1/models" >/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || { echo "server exited while loading" >&2; return 1; }
    sleep 0.25
  done
  echo "server not ready after 300 s" >&2
  return 1
}

run_one() {  # SERVER URL FORMAT CONCURRENCY ROUND
  local out="$model/vs/$1-$3-c$4-r$5.json"
  "$loadtest" --url "$2" --scenario "$scenario" --concurrency "$4" "${window[@]}" \
    --timeout "$timeout" --summary-only --output "$out" >/dev/null 2>&1
  python3 - "$out" "$1" "$3" "$4" "$5" <<'PY'
import json, sys
path, server, fmt, c, r = sys.argv[1:]
s = json.load(open(path))["summary"]
print(f"{server:10} {fmt:7} c={c:<3} round {r}: {s['output_throughput']:8.1f} out tok/s  "
      f"TPOT mean {s['tpot_ms']['mean']:7.1f} ms  TTFT mean {s['ttft_ms']['mean']:7.1f} ms  "
      f"ok {s['successful_requests']} failed {s['failed_requests']}", flush=True)
PY
}

for f in $formats; do
  gguf=$model/model-$f.gguf
  for c in $concurrencies; do
    # Both servers stay up for the point; only the one under load computes.
    "$peer/bin/llama-server" -m "$gguf" --host 127.0.0.1 --port 18081 -t "$(nproc)" \
      -np "$c" -c $((c * 256)) >"$model/vs/llama-$f-c$c.log" 2>&1 &
    lpid=$!
    "$distillery" serve --model "$gguf" --host 127.0.0.1 --port 18082 --disable-log-requests \
      >"$model/vs/distillery-$f-c$c.log" 2>&1 &
    dpid=$!
    pids=("$lpid" "$dpid")
    wait_ready http://127.0.0.1:18081 "$lpid"
    wait_ready http://127.0.0.1:18082 "$dpid"
    for r in $(seq 1 "$rounds"); do
      if [ $((r % 2)) -eq 1 ]; then order="llama distillery"; else order="distillery llama"; fi
      for s in $order; do
        if [ "$s" = llama ]; then port=18081; else port=18082; fi
        run_one "$s" "http://127.0.0.1:$port" "$f" "$c" "$r"
      done
    done
    cleanup
    wait "$lpid" "$dpid" 2>/dev/null || true
  done
done
