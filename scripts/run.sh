#!/usr/bin/env bash
# Runs the engagement pipeline locally: starts PostgreSQL, a Kafka-protocol broker, Redis and
# ClickHouse on loopback (scripts/services.sh), a coordinator, two workers and the external-API
# stand-in; submits the ingest and process jobs; then inserts engagement events into PostgreSQL at
# RATE per second (default 200) until Ctrl-C, which stops everything but the services
# (`scripts/services.sh stop` stops those). COORDINATORS=3 runs three coordinators replicating
# with Raft instead of one (kill -9 the leader, `eddy coordinators` shows the next).
source "$(dirname "$0")/common.sh"
RATE=${RATE:-200}
RUN_DIR=${RUN_DIR:-$EDDY_CACHE/run}
rm -rf "$RUN_DIR" && mkdir -p "$RUN_DIR"

"$ROOT/scripts/services.sh" start
eval "$("$ROOT/scripts/services.sh" env)"
log "building Eddy (release)"
BIN=$(build_bins release)

PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null' EXIT
PORT=${EDDY_PORT:-6123}
COORDINATORS=${COORDINATORS:-1}
HTTP_PORT=${EDDY_HTTP_PORT:-8081}
PEERS=$(for i in $(seq 1 "$COORDINATORS"); do printf '%s=127.0.0.1:%s\n' "$i" $((PORT + 10 * (i - 1))); done | paste -sd,)
export EDDY_COORDINATOR=$(sed 's/[0-9]*=//g' <<<"$PEERS")
export EDDY_EXTERNAL_URL=http://127.0.0.1:${EDDY_MOCK_PORT:-58080}/events
# A slot left by an earlier run is read again from its position rather than refused.
export EDDY_EXISTING_SLOT=${EDDY_EXISTING_SLOT:-reread}
export EDDY_DEAD_LETTERS=$RUN_DIR/files/dead-letters.jsonl EDDY_HTTP_DEAD_LETTERS=$RUN_DIR/files/http-dead-letters.jsonl
if [ "$COORDINATORS" = 1 ]; then
  "$BIN/eddy-coordinator" --listen "$EDDY_COORDINATOR" --http-listen "127.0.0.1:$HTTP_PORT" --data-dir "$RUN_DIR/coordinator" >"$RUN_DIR/coordinator.log" 2>&1 & PIDS+=($!)
else
  for i in $(seq 1 "$COORDINATORS"); do
    "$BIN/eddy-coordinator" --listen "127.0.0.1:$((PORT + 10 * (i - 1)))" --http-listen "127.0.0.1:$((HTTP_PORT + 10 * (i - 1)))" --raft-id "$i" --raft-peers "$PEERS" \
      --data-dir "$RUN_DIR/coordinator$i" --checkpoint-dir "$RUN_DIR/checkpoints" >"$RUN_DIR/coordinator$i.log" 2>&1 & PIDS+=($!)
  done
fi
for i in 1 2; do
  "$BIN/eddy-worker" --coordinator "$EDDY_COORDINATOR" --listen 127.0.0.1:0 --id "worker-$i" --state-dir "$RUN_DIR/worker-$i-state" --allow-dir "$RUN_DIR/files" >"$RUN_DIR/worker-$i.log" 2>&1 & PIDS+=($!)
done
"$BIN/eddy-mock-api" --listen "127.0.0.1:${EDDY_MOCK_PORT:-58080}" --log "$RUN_DIR/external.jsonl" >"$RUN_DIR/mock-api.log" 2>&1 & PIDS+=($!)
wait_workers 2
"$BIN/eddy" workers
ingest=$("$BIN/eddy" submit "$ROOT/jobs/specs/ingest.toml")
process=$("$BIN/eddy" submit "$ROOT/jobs/specs/process.toml")
log "submitted ingest ($ingest) and process ($process)"
"$BIN/eddy-datagen" --pg-url "$EDDY_PG_URL" --rate "$RATE" --seconds 86400 --updates-pct 5 --deletes-pct 2 --unknown-pct 3 \
  >"$RUN_DIR/datagen.log" 2>&1 & PIDS+=($!)
cat <<MSG

Eddy is running the engagement pipeline; events are inserted at $RATE/s. Where to look:
  jobs           $BIN/eddy jobs ; $BIN/eddy status $process
  web page       http://127.0.0.1:$HTTP_PORT/ (Prometheus metrics on /metrics)
  leaderboard    redis-cli -p ${EDDY_REDIS_PORT:-56379} ZREVRANGE leaderboard 0 9 WITHSCORES
  ClickHouse     curl -s '$EDDY_CLICKHOUSE_URL' --data-binary 'SELECT count() FROM eddy.engagement_enriched FINAL WHERE deleted = 0'
  external API   curl -s http://127.0.0.1:${EDDY_MOCK_PORT:-58080}/stats
  logs           $RUN_DIR
Ctrl-C stops the cluster; scripts/services.sh stop stops the services.
MSG
wait
