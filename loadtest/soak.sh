#!/usr/bin/env bash
# Soak run (not part of CI): one daemon under a steady open-loop load for a long time (10 minutes
# by default), checking that nothing fails, that resident memory stays flat and that every KV
# block is free again at the end.
#
#   loadtest/soak.sh MODEL [options] [-- extra `distillery serve` flags]
#
#   MODEL                 what `distillery serve --model` takes: a folder, a hub id, builtin:tiny
#   --rate R              arrivals per second; default `auto`: 70% of the maximum measured first
#                         (a closed loop at --max-concurrency for --max-duration)
#   --duration D          how long the soak load runs (default 10m; loadtest syntax: 90s, 10m, 1h)
#   --scenario FILE       default loadtest/scenarios/customer-service.toml
#   --sample-every S      seconds between RSS samples (default 30)
#   --rss-warmup S        seconds of load before the start RSS is taken (default 60): the first
#                         minute fills allocator pools, connection buffers and the prefix cache
#   --max-rss-growth P    fail when the end RSS exceeds the start RSS by more than P percent
#                         (default 10)
#   --max-concurrency N   the maximum-rate measurement's closed loop (default 64)
#   --max-duration D      its length (default 20s)
#   --out DIR             where the logs, reports and rss.csv go (default: a new temp dir)
#   --slowloris N         also keep N sockets sending headers one byte a second, plus N/5 silent
#                         ones, for the whole soak (loadtest/slowloris.py); the soak then also
#                         fails if the daemon did not close them at its header deadline
#
# Needs target/release/distillery and target/release/distillery-loadtest
# (`cargo build --release --workspace`), curl and python3. Exits non-zero on a failed request,
# a KV block or request still held at the end, or RSS growth over the limit.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "soak: $*" >&2; exit 2; }

[ $# -ge 1 ] || die "usage: loadtest/soak.sh MODEL [--rate R|auto] [--duration 10m] [...] [-- serve flags]"
model=$1; shift
rate=auto
duration=10m
scenario=loadtest/scenarios/customer-service.toml
sample_every=30
max_growth=10
rss_warmup=60
max_concurrency=64
max_duration=20s
out=""
slowloris=0
serve_extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --rate) rate=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --scenario) scenario=$2; shift 2 ;;
    --sample-every) sample_every=$2; shift 2 ;;
    --max-rss-growth) max_growth=$2; shift 2 ;;
    --rss-warmup) rss_warmup=$2; shift 2 ;;
    --max-concurrency) max_concurrency=$2; shift 2 ;;
    --max-duration) max_duration=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --slowloris) slowloris=$2; shift 2 ;;
    --) shift; serve_extra=("$@"); break ;;
    *) die "unknown option $1" ;;
  esac
done

daemon_bin=target/release/distillery
load_bin=target/release/distillery-loadtest
for b in "$daemon_bin" "$load_bin"; do
  [ -x "$b" ] || die "$b is missing: cargo build --release --workspace"
done
command -v curl >/dev/null || die "curl is needed"
command -v python3 >/dev/null || die "python3 is needed"
[ -f "$scenario" ] || die "no scenario file $scenario"
[ -n "$out" ] || out=$(mktemp -d -t distillery-soak-XXXXXX)
mkdir -p "$out"

# --- the daemon --------------------------------------------------------------------------------
"$daemon_bin" serve --host 127.0.0.1 --port 0 --model "$model" "${serve_extra[@]}" \
  >"$out/daemon.stdout" 2>"$out/daemon.log" &
pid=$!
load_pid=""
slow_pid=""
cleanup() {
  [ -n "$load_pid" ] && kill "$load_pid" 2>/dev/null || true
  [ -n "$slow_pid" ] && kill "$slow_pid" 2>/dev/null || true
  kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
}
trap cleanup EXIT

url=""
for _ in $(seq 1 1200); do   # model load: up to 2 minutes
  url=$(grep -o 'http://127.0.0.1:[0-9]*' "$out/daemon.stdout" | head -1 || true)
  [ -n "$url" ] && break
  kill -0 "$pid" 2>/dev/null || { tail -20 "$out/daemon.log" >&2; die "the daemon exited at start"; }
  sleep 0.1
done
[ -n "$url" ] || die "the daemon printed no address within 2 minutes"
for _ in $(seq 1 100); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/ready")" = 200 ] && break
  sleep 0.1
done
echo "soak: daemon pid $pid at $url (model $model); output in $out"

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$pid/status"; }

# The value of a sample in /metrics: metric name, then an optional label filter (a substring).
metric() {
  curl -s "$url/metrics" | awk -v name="$1" -v filter="${2:-}" '
    $0 !~ /^#/ && (index($0, name "{") == 1 || index($0, name " ") == 1) &&
      (filter == "" || index($0, filter) > 0) && !found { print $NF; found = 1 }'
}

json_field() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval("d"+sys.argv[2]))' "$1" "$2"; }

# --- the maximum rate, when not given ------------------------------------------------------------
if [ "$rate" = auto ]; then
  echo "soak: measuring the maximum rate (closed loop, $max_concurrency in flight, $max_duration)"
  "$load_bin" --url "$url" --scenario "$scenario" --concurrency "$max_concurrency" \
    --duration "$max_duration" --no-progress --summary-only --output "$out/max.json" \
    >"$out/max.txt" 2>&1
  max=$(json_field "$out/max.json" '["summary"]["request_throughput"]')
  rate=$(python3 -c "print(round(0.7 * $max, 1))")
  echo "soak: maximum $max req/s; soaking at 70%: $rate req/s"
fi

# --- the soak ------------------------------------------------------------------------------------
echo "elapsed_s,rss_kb" >"$out/rss.csv"
idle_rss=$(rss_kb)
echo "0,$idle_rss" >>"$out/rss.csv"
start_rss=""
if [ "$slowloris" -gt 0 ]; then
  python3 loadtest/slowloris.py "${url#http://}" --sockets "$slowloris" --silent $(( slowloris / 5 )) \
    >"$out/slowloris.json" 2>"$out/slowloris.log" &
  slow_pid=$!
  echo "soak: $slowloris slowloris sockets and $(( slowloris / 5 )) silent ones beside the load"
fi
started=$(date +%s)
"$load_bin" --url "$url" --scenario "$scenario" --request-rate "$rate" --duration "$duration" \
  --no-progress --summary-only --output "$out/soak.json" >"$out/soak.txt" 2>&1 &
load_pid=$!
echo "soak: $rate req/s for $duration; RSS sampled every ${sample_every}s into $out/rss.csv"
max_rss=$idle_rss
next=$sample_every
while kill -0 "$load_pid" 2>/dev/null; do
  sleep 1
  now=$(( $(date +%s) - started ))
  if [ "$now" -ge "$next" ] || { [ -z "$start_rss" ] && [ "$now" -ge "$rss_warmup" ]; }; then
    r=$(rss_kb)
    echo "$now,$r" >>"$out/rss.csv"
    [ "$r" -gt "$max_rss" ] && max_rss=$r
    if [ -z "$start_rss" ] && [ "$now" -ge "$rss_warmup" ]; then
      start_rss=$r
      echo "soak: ${now}s RSS ${r} kB (the start RSS, after the ${rss_warmup}s warm-up)"
    else
      echo "soak: ${now}s RSS ${r} kB"
    fi
    [ "$now" -ge "$next" ] && next=$(( next + sample_every ))
  fi
done
# A run shorter than the warm-up compares with the RSS before the load.
[ -n "$start_rss" ] || start_rss=$idle_rss
load_status=0
wait "$load_pid" || load_status=$?
load_pid=""
if [ -n "$slow_pid" ]; then
  kill -TERM "$slow_pid" 2>/dev/null || true
  wait "$slow_pid" 2>/dev/null || true
  slow_pid=""
fi
end_rss=$(rss_kb)
echo "$(( $(date +%s) - started )),$end_rss" >>"$out/rss.csv"
[ "$end_rss" -gt "$max_rss" ] && max_rss=$end_rss
cat "$out/soak.txt"

# --- the checks ------------------------------------------------------------------------------------
fail=0
[ "$load_status" = 0 ] || { echo "FAIL: distillery-loadtest exited $load_status" >&2; fail=1; }
ok=$(json_field "$out/soak.json" '["summary"]["successful_requests"]')
failed=$(json_field "$out/soak.json" '["summary"]["failed_requests"]')
[ "$failed" = 0 ] || { echo "FAIL: $failed failed requests (see $out/soak.json)" >&2; fail=1; }

# The last responses are out; the engine may still be freeing the last sequences: poll briefly.
for _ in $(seq 1 100); do
  running=$(metric distillery:num_requests_running)
  waiting=$(metric distillery:num_requests_waiting)
  used=$(metric distillery:kv_cache_blocks 'state="used"')
  [ "$running" = 0 ] && [ "$waiting" = 0 ] && [ "$used" = 0 ] && break
  sleep 0.1
done
free=$(metric distillery:kv_cache_blocks 'state="free"')
cached=$(metric distillery:kv_cache_blocks 'state="cached"')
total=$(curl -s "$url/metrics" | grep -o '^distillery:cache_config_info{[^}]*num_gpu_blocks="[0-9]*"' \
  | grep -o 'num_gpu_blocks="[0-9]*"' | grep -o '[0-9]*' || echo "?")
[ "$running" = 0 ] || { echo "FAIL: $running requests still running" >&2; fail=1; }
[ "$waiting" = 0 ] || { echo "FAIL: $waiting requests still waiting" >&2; fail=1; }
[ "$used" = 0 ] || { echo "FAIL: $used KV blocks still used" >&2; fail=1; }
if [ "$total" != "?" ] && [ $(( free + cached )) != "$total" ]; then
  echo "FAIL: free $free + cached $cached blocks is not all $total blocks" >&2; fail=1
fi

slow_report="none"
if [ "$slowloris" -gt 0 ]; then
  slow_report=$(cat "$out/slowloris.json" 2>/dev/null || echo "{}")
  closed=$(json_field "$out/slowloris.json" '["closed_by_server"]' 2>/dev/null || echo 0)
  [ "$closed" -gt 0 ] || { echo "FAIL: the daemon closed no slowloris socket" >&2; fail=1; }
fi

growth=$(python3 -c "print(round(100.0 * ($end_rss - $start_rss) / $start_rss, 1))")
if python3 -c "import sys; sys.exit(0 if $growth <= $max_growth else 1)"; then :; else
  echo "FAIL: RSS grew ${growth}% (limit ${max_growth}%)" >&2; fail=1
fi

echo
echo "== soak summary ($out)"
echo "rate:             $rate req/s for $duration ($ok requests, $failed failed)"
echo "idle RSS:         $idle_rss kB (before the load)"
echo "start RSS:        $start_rss kB (after ${rss_warmup}s of load)"
echo "end RSS:          $end_rss kB (${growth}%; peak $max_rss kB)"
echo "KV blocks at end: used $used, free $free, cached $cached, total $total"
echo "requests at end:  running $running, waiting $waiting"
echo "slowloris:        $slow_report"
if [ "$fail" = 0 ]; then echo "PASS"; else echo "FAIL"; fi
exit "$fail"
