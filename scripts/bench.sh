#!/usr/bin/env bash
# Benchmarks. Usage: scripts/bench.sh NAME
#   window   generator -> HOP(10 min, 5 s) SUM per key (1,000 keys) -> discard, on one worker.
#            Env: N (events, default 10,000,000), KEYS (1000), EV_PER_MS (10).
#   pipeline the engagement pipeline on local services: commit-to-visible latency in ClickHouse and
#            at the external API at a fixed rate, and CDC throughput next to pg_recvlogical.
#            Env: RATE (events/s, default 5000), SECONDS_ (default 20), CDC_ROWS (200,000).
# Every benchmark prints `name=value` lines on stdout; progress goes to stderr.
source "$(dirname "$0")/common.sh"

name=${1:-}
[ -n "$name" ] || { echo "usage: scripts/bench.sh window" >&2; exit 2; }

RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/eddy-bench.XXXXXX")
PIDS=()
cleanup() {
  local status=$?
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$status" = 0 ]; then rm -rf "$RUN_DIR"; else echo "logs kept in $RUN_DIR" >&2; fi
}
trap cleanup EXIT

start_cluster() {
  local workers=$1 slots=$2 port i
  port=$(free_port)
  export EDDY_COORDINATOR=127.0.0.1:$port
  RUST_LOG=warn "$BIN/eddy-coordinator" --listen "$EDDY_COORDINATOR" >"$RUN_DIR/coordinator.log" 2>&1 &
  PIDS+=($!)
  WORKER_PIDS=()
  for i in $(seq 1 "$workers"); do
    RUST_LOG=warn "$BIN/eddy-worker" --coordinator "$EDDY_COORDINATOR" --listen 127.0.0.1:0 --id "w$i" --slots "$slots" >"$RUN_DIR/w$i.log" 2>&1 &
    PIDS+=($!)
    WORKER_PIDS+=($!)
  done
  wait_workers "$workers"
}

bench_window() {
  local n=${N:-10000000} keys=${KEYS:-1000} ev_per_ms=${EV_PER_MS:-10}
  log "building release binaries"
  BIN=$(build_bins release)
  start_cluster 1 2
  cat >"$RUN_DIR/window.toml" <<SPEC
name = "bench-window"

[[source]]
name = "events"
connector = "generator"
options = { count = $n, keys = $keys, seed = 1, events_per_ms = $ev_per_ms }
event_time = { column = "ts", allowed_delay = "1s" }

[[window]]
name = "hop"
input = "events"
kind = "hop"
size = "10m"
slide = "5s"
key = ["k"]
aggregates = "SUM(score) AS total"

[[sink]]
name = "out"
input = "hop"
connector = "discard"
SPEC
  local pid=${WORKER_PIDS[0]} cpu0 cpu1 job status
  cpu0=$(cpu_seconds "$pid")
  log "running $n events, $keys keys"
  job=$("$BIN/eddy" submit "$RUN_DIR/window.toml")
  wait_job "$job" finished 900
  cpu1=$(cpu_seconds "$pid")
  status=$("$BIN/eddy" status "$job" --json)
  python3 - "$n" "$cpu0" "$cpu1" "$(peak_rss_mb "$pid")" "$status" <<'PY'
import json, sys
n, cpu0, cpu1, rss = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
s = json.loads(sys.argv[5])
wall = (s["finished_at_ms"] - s["running_since_ms"]) / 1000
out = sum(t["records_out"] for t in s["tasks"] if t["operators"].startswith("hop"))
print(f"window_events={n}")
print(f"window_results={out}")
print(f"window_wall_seconds={wall:.2f}")
print(f"window_cpu_seconds={cpu1 - cpu0:.2f}")
print(f"window_events_per_second={n / wall:.0f}")
print(f"window_events_per_cpu_second={n / (cpu1 - cpu0):.0f}")
print(f"worker_peak_rss_mb={rss}")
PY
}

bench_pipeline() {
  "$ROOT/scripts/services.sh" start >&2
  eval "$("$ROOT/scripts/services.sh" env)"
  log "building release binaries"
  BIN=$(build_bins release)
  start_cluster 2 4
  MOCK_PORT=$(free_port)
  "$BIN/eddy-mock-api" --listen "127.0.0.1:$MOCK_PORT" --log "$RUN_DIR/external.jsonl" >"$RUN_DIR/mock-api.log" 2>&1 &
  PIDS+=($!)
  export BIN RUN_DIR MOCK_PORT
  (cd "$ROOT" && python3 scripts/bench_pipeline.py)
}

case $name in
  window) bench_window ;;
  pipeline) bench_pipeline ;;
  *) echo "unknown benchmark '$name'; available: window, pipeline" >&2; exit 2 ;;
esac
