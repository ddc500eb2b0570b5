#!/usr/bin/env bash
# Starts a local Eddy cluster (a coordinator and two workers) and runs a demo job on it: generated
# events -> HOP(10 min, 5 s) SUM per key -> JSON lines. Ctrl-C stops everything.
source "$(dirname "$0")/common.sh"
RUN_DIR=${RUN_DIR:-$EDDY_CACHE/run}
rm -rf "$RUN_DIR" && mkdir -p "$RUN_DIR/out"
log "building"
BIN=$(build_bins release)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null' EXIT
export EDDY_COORDINATOR=127.0.0.1:${EDDY_PORT:-6123}
"$BIN/eddy-coordinator" --listen "$EDDY_COORDINATOR" >"$RUN_DIR/coordinator.log" 2>&1 & PIDS+=($!)
for i in 1 2; do
  "$BIN/eddy-worker" --coordinator "$EDDY_COORDINATOR" --listen "127.0.0.1:$(free_port)" --id "worker-$i" >"$RUN_DIR/worker-$i.log" 2>&1 & PIDS+=($!)
done
wait_workers 2
"$BIN/eddy" workers
job=$(EVENTS=${EVENTS:-3000000} OUT="$RUN_DIR/out" "$BIN/eddy" submit "$ROOT/jobs/specs/hop-sum.toml")
log "submitted $job; waiting for it to finish"
wait_job "$job" finished 600
"$BIN/eddy" status "$job"
log "window results (first lines of $RUN_DIR/out/windows.jsonl.0):"
head -5 "$RUN_DIR/out/windows.jsonl.0"
echo "Logs: $RUN_DIR. The cluster keeps running for more jobs (EDDY_COORDINATOR=$EDDY_COORDINATOR); Ctrl-C stops it."
wait
