#!/usr/bin/env bash
# Benchmarks. Usage: scripts/bench.sh NAME
#   window   generator -> HOP(10 min, 5 s) SUM per key (1,000 keys) -> discard, on one worker.
#            Env: N (events, default 10,000,000), KEYS (1000), EV_PER_MS (10).
#   pipeline the engagement pipeline on local services: commit-to-visible latency in ClickHouse and
#            at the external API at a fixed rate, and CDC throughput next to pg_recvlogical.
#            Env: RATE (events/s, default 5000), SECONDS_ (default 20), CDC_ROWS (200,000).
#   recovery kill -9 of a worker running window tasks (small state) -> first output of the new
#            attempt, three times; prints the median and the worst. Env: KILLS (3).
#   checkpoint checkpoint duration (p99) and sizes (full, incremental) with RocksDB state at
#            100,000 and 1,000,000 keys. Env: KEY_COUNTS ("100000 1000000").
#   vs-flink HOP-window throughput per CPU-second and peak RSS of Eddy and Flink 2.3 on the same
#            events file, RocksDB state on both sides. Env: N (5,000,000), KEYS (1000).
#   chaos    the engagement pipeline on local services under faults (worker kills, a coordinator
#            kill, a PostgreSQL restart, Redis, ClickHouse and external-system outages) while events
#            are written, then every outcome checked against PostgreSQL (tests/chaos.rs; the test
#            command runs a short version). Env: CHAOS_SECONDS (600), CHAOS_KILLS (CHAOS_SECONDS/40),
#            CHAOS_OUTAGE_SECONDS (CHAOS_SECONDS/8, 5 to 60), CHAOS_PREFILL_ROWS, CHAOS_RATE (200), CHAOS_STATE_TTL (11m), EDDY_TEST_SEED (random,
#            printed as chaos_seed), CHAOS_PROFILE (debug, as the test command builds; or
#            release), CHAOS_COORDINATORS (1; 3 replicates them and kills the leader).
#            chaos_mismatches must be 0.
#   failover kill -9 of the leading coordinator of three (Raft) while a checkpointed job runs on two
#            workers -> a submit succeeds on the new leader, KILLS (3) times with the old leader
#            back in between; prints the median and worst seconds and how many times the running
#            job restarted (goal 0). Env: KILLS (3), FAILOVER_PROFILE (debug; or release).
#   snapshot the CDC source's snapshot of one table (the engagement columns, SNAPSHOT_ROWS rows,
#            default 10,000,000; made once and kept) at parallelism 1 and 2 into a discard sink,
#            next to `COPY (SELECT …) TO STDOUT` of the same rows by psql in the same run. Rates
#            come from the source's own figures (rows over the time from its first chunk to its
#            last; with two subtasks, all rows over the longer of the two); the wall time from
#            submit to the last row counted is printed too. Env: SNAPSHOT_ROWS, CHUNK_PAGES (4096).
# Every benchmark prints `name=value` lines on stdout; progress goes to stderr. The release ones
# measure EDDY_BENCH_BIN instead of building, when it names a directory of prebuilt binaries (an
# earlier version's, say, for a before/after in one sitting).
source "$(dirname "$0")/common.sh"

release_bins() {
  if [ -n "${EDDY_BENCH_BIN:-}" ]; then
    echo "$EDDY_BENCH_BIN"
  else
    build_bins release
  fi
}

name=${1:-}
[ -n "$name" ] || { echo "usage: scripts/bench.sh window" >&2; exit 2; }

RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/eddy-bench.XXXXXX")
# The workers let jobs use files under RUN_DIR/files only (--allow-dir): dead letters go there.
export EDDY_DEAD_LETTERS=$RUN_DIR/files/dead-letters.jsonl EDDY_HTTP_DEAD_LETTERS=$RUN_DIR/files/http-dead-letters.jsonl
PIDS=()
cleanup() {
  local status=$?
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  # Processes started by a script of their own (restarted coordinators, replacement workers).
  for f in "$RUN_DIR"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$status" = 0 ]; then rm -rf "$RUN_DIR"; else echo "logs kept in $RUN_DIR" >&2; fi
}
trap cleanup EXIT

start_cluster() {
  local workers=$1 slots=$2 port i
  port=$(free_port)
  export EDDY_COORDINATOR=127.0.0.1:$port
  RUST_LOG=warn "$BIN/eddy-coordinator" --listen "$EDDY_COORDINATOR" --data-dir "$RUN_DIR/coordinator" >"$RUN_DIR/coordinator.log" 2>&1 &
  PIDS+=($!)
  WORKER_PIDS=()
  for i in $(seq 1 "$workers"); do
    start_worker "w$i" "$slots"
  done
  wait_workers "$workers"
}

# Starts worker $1 with $2 slots; its pid goes to WORKER_PIDS and to $RUN_DIR/$1.pid.
start_worker() {
  RUST_LOG=warn "$BIN/eddy-worker" --coordinator "$EDDY_COORDINATOR" --listen 127.0.0.1:0 --id "$1" --slots "$2" \
    --state-dir "$RUN_DIR/$1-state" --allow-dir "$RUN_DIR/files" >"$RUN_DIR/$1.log" 2>&1 &
  PIDS+=($!)
  WORKER_PIDS+=($!)
  echo $! >"$RUN_DIR/$1.pid"
}

bench_window() {
  local n=${N:-10000000} keys=${KEYS:-1000} ev_per_ms=${EV_PER_MS:-10}
  log "building release binaries"
  BIN=$(release_bins)
  start_cluster 1 2
  hop_job "$(generator_source "count = $n, keys = $keys, seed = 1, events_per_ms = $ev_per_ms")" 1 5s "${BACKEND:-rocksdb}" >"$RUN_DIR/window.toml"
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

# A Python with kafka-python (for the pipeline's per-hop breakdown), in a venv of the benchmarks'
# own; plain python3 (no breakdown) when it cannot be installed.
bench_python() {
  local venv="$EDDY_CACHE/tools/bench-venv"
  if ! "$venv/bin/python" -c 'import kafka' 2>/dev/null; then
    python3 -m venv "$venv" >&2 && "$venv/bin/pip" install -q 'kafka-python==2.0.3' >&2 || {
      echo "python3"
      return
    }
  fi
  echo "$venv/bin/python"
}

bench_pipeline() {
  "$ROOT/scripts/services.sh" start >&2
  eval "$("$ROOT/scripts/services.sh" env)"
  log "building release binaries"
  BIN=$(release_bins)
  start_cluster 2 4
  MOCK_PORT=$(free_port)
  "$BIN/eddy-mock-api" --listen "127.0.0.1:$MOCK_PORT" --log "$RUN_DIR/external.jsonl" >"$RUN_DIR/mock-api.log" 2>&1 &
  PIDS+=($!)
  export BIN RUN_DIR MOCK_PORT
  local python
  python=$(bench_python)
  (cd "$ROOT" && "$python" scripts/bench_pipeline.py)
}

# A generator source with options $1, event time on `ts`.
generator_source() {
  cat <<SPEC
[[source]]
name = "events"
connector = "generator"
parallelism = 1
options = { $1 }
event_time = { column = "ts", allowed_delay = "1s" }
SPEC
}

# A HOP(10 min, 5 s) SUM-per-key job: $1 = its [[source]] (named events, key k, score), $2 = window
# parallelism, $3 = checkpoint interval, $4 = state backend (default rocksdb).
hop_job() {
  cat <<SPEC
name = "bench-hop"
[state]
backend = "${4:-rocksdb}"
checkpoint_interval = "$3"
$1
[[window]]
name = "hop"
input = "events"
kind = "hop"
size = "10m"
slide = "5s"
key = ["k"]
aggregates = "SUM(score) AS total"
parallelism = $2
[[sink]]
name = "out"
input = "hop"
connector = "discard"
parallelism = 1
SPEC
}

bench_recovery() {
  log "building release binaries"
  BIN=$(release_bins)
  start_cluster 3 1
  # Event time runs 20 s per second, so windows (5 s slide) fire every 0.25 s of wall time.
  hop_job "$(generator_source "keys = 1000, seed = 1, events_per_ms = 1, rate = 20000")" 2 1s >"$RUN_DIR/recovery.toml"
  local job
  job=$("$BIN/eddy" submit "$RUN_DIR/recovery.toml")
  wait_job "$job" running 60
  export BIN RUN_DIR ROOT JOB=$job KILLS=${KILLS:-3}
  python3 - <<'PY'
import json, os, signal, statistics, subprocess, sys, time
sys.path.insert(0, os.path.join(os.environ["ROOT"], "scripts"))
from bench_checkpoints import wait_checkpoint
BIN, RUN, JOB = os.environ["BIN"], os.environ["RUN_DIR"], os.environ["JOB"]
def status():
    return json.loads(subprocess.run([f"{BIN}/eddy", "status", JOB, "--json"], capture_output=True, check=True).stdout)
def window_tasks(s):
    return [t for t in s["tasks"] if t["operators"].startswith("hop")]
times, last = [], wait_checkpoint(status, 0)
for i in range(int(os.environ["KILLS"])):
    time.sleep(2)
    s = status()
    victim = window_tasks(s)[-1]["worker_id"]
    pid = int(open(f"{RUN}/{victim}.pid").read())
    attempt = s["attempt"]
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    # The first output of the new attempt: a window result counted by a window task of it.
    while True:
        s = status()
        if s["attempt"] > attempt and s["state"] == "running" and sum(t["records_out"] for t in window_tasks(s)) > 0:
            break
        time.sleep(0.01)
    took = time.monotonic() - killed
    times.append(took)
    print(f"kill {i + 1}: {victim} -> first output of attempt {s['attempt']} after {took:.2f} s", file=sys.stderr)
    # A replacement joins, as an orchestrator would start one; then wait for a checkpoint.
    out = open(f"{RUN}/r{i}.log", "w")
    worker = subprocess.Popen(
        [f"{BIN}/eddy-worker", "--coordinator", os.environ["EDDY_COORDINATOR"], "--listen", "127.0.0.1:0",
         "--id", f"r{i}", "--slots", "1", "--state-dir", f"{RUN}/r{i}-state", "--allow-dir", f"{RUN}/files"],
        stdout=out, stderr=out, env={**os.environ, "RUST_LOG": "warn"})
    open(f"{RUN}/r{i}.pid", "w").write(str(worker.pid))
    last = wait_checkpoint(status, last)
print(f"recovery_seconds={statistics.median(times):.2f}")
print(f"recovery_seconds_max={max(times):.2f}")
print(f"recovery_kills={len(times)}")
PY
  # The replacements are not in PIDS: stop them here.
  for f in "$RUN_DIR"/r*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
}

bench_failover() {
  local profile=${FAILOVER_PROFILE:-debug} i peers="" list="" port
  log "building $profile binaries"
  [ "$profile" = debug ] && lint_while_building  # the test command's build, reused
  BIN=$(build_bins "$profile" --tests)  # with the tests: the feature set the test command builds
  for i in 1 2 3; do
    port=$(free_port)
    peers+="${peers:+,}$i=127.0.0.1:$port"
    list+="${list:+,}127.0.0.1:$port"
  done
  export EDDY_COORDINATOR=$list BIN RUN_DIR ROOT PEERS=$peers KILLS=${KILLS:-3}
  for i in 1 2 3; do start_coordinator "$i"; done
  WORKER_PIDS=()
  start_worker w1 2
  start_worker w2 2
  wait_workers 2
  hop_job "$(generator_source "keys = 1000, seed = 1, events_per_ms = 1, rate = 20000")" 2 1s >"$RUN_DIR/failover.toml"
  generator_source "keys = 10, seed = 2, events_per_ms = 1, rate = 100" | sed '1i name = "probe"' >"$RUN_DIR/probe.toml"
  printf '[[sink]]\nname = "out"\ninput = "events"\nconnector = "blackhole"\n' >>"$RUN_DIR/probe.toml"
  local job
  job=$("$BIN/eddy" submit "$RUN_DIR/failover.toml")
  wait_job "$job" running 60
  export JOB=$job
  python3 - <<'PY'
import json, os, signal, statistics, subprocess, sys, time
sys.path.insert(0, os.path.join(os.environ["ROOT"], "scripts"))
from bench_checkpoints import wait_checkpoint
BIN, RUN, JOB = os.environ["BIN"], os.environ["RUN_DIR"], os.environ["JOB"]
def eddy(*args):
    return subprocess.run([f"{BIN}/eddy", *args], capture_output=True, text=True)
def status():
    while True:
        r = eddy("status", JOB, "--json")
        if r.returncode == 0:
            return json.loads(r.stdout)
        time.sleep(0.05)
def leader():
    while True:
        r = eddy("coordinators", "--json")
        if r.returncode == 0:
            ids = [c["id"] for c in json.loads(r.stdout)["coordinators"] if c["role"] == "leader"]
            if ids:
                return ids[0]
        time.sleep(0.05)
times, restarts, last = [], 0, wait_checkpoint(status, 0)
for i in range(int(os.environ["KILLS"])):
    old = leader()
    attempt = status()["attempt"]
    killed = time.monotonic()
    os.kill(int(open(f"{RUN}/coordinator{old}.pid").read()), signal.SIGKILL)
    while True:
        r = eddy("submit", f"{RUN}/probe.toml")
        if r.returncode == 0:
            break
        time.sleep(0.02)
    took = time.monotonic() - killed
    times.append(took)
    probe = r.stdout.strip()
    eddy("cancel", probe)
    last = wait_checkpoint(status, last)
    restarts += status()["attempt"] - attempt
    print(f"kill {i + 1}: coordinator {old} -> a submit succeeded after {took:.2f} s; job attempt {attempt} -> {status()['attempt']}", file=sys.stderr)
    subprocess.run(["bash", "-c", f"source {os.environ['ROOT']}/scripts/common.sh; start_coordinator {old}"], check=True,
                   env={**os.environ})
    # Back as a follower, caught up, before the next kill.
    while True:
        r = eddy("coordinators", "--json")
        if r.returncode == 0:
            cs = json.loads(r.stdout)["coordinators"]
            lead = [c["applied"] for c in cs if c["role"] == "leader"]
            back = [c for c in cs if c["id"] == old]
            if lead and back and back[0]["role"] == "follower" and back[0]["applied"] == lead[0]:
                break
        time.sleep(0.1)
print(f"failover_seconds={statistics.median(times):.2f}")
print(f"failover_seconds_max={max(times):.2f}")
print(f"failover_job_restarts={restarts}")
print(f"failover_kills={len(times)}")
PY
}

bench_checkpoint() {
  log "building release binaries"
  BIN=$(release_bins)
  start_cluster 1 2
  local keys job
  for keys in ${KEY_COUNTS:-100000 1000000}; do
    # 3 events per key on average over about 20 s, within a few seconds of event time: the state
    # grows to about every key while checkpoints are taken every second under load.
    hop_job "$(generator_source "count = $((keys * 3)), keys = $keys, seed = 1, events_per_ms = 1000, rate = $((keys * 3 / 20))")" 1 1s >"$RUN_DIR/checkpoint-$keys.toml"
    log "checkpoints with $keys keys"
    job=$("$BIN/eddy" submit "$RUN_DIR/checkpoint-$keys.toml")
    wait_job "$job" running 60
    BIN=$BIN JOB=$job KEYS=$keys python3 - <<'PY'
import json, os, statistics, subprocess, time
BIN, JOB, KEYS = os.environ["BIN"], os.environ["JOB"], os.environ["KEYS"]
seen = {}
while True:
    s = json.loads(subprocess.run([f"{BIN}/eddy", "status", JOB, "--json"], capture_output=True, check=True).stdout)
    for c in s["checkpoints"]:
        if c["state"] == "completed":
            seen[c["checkpoint_id"]] = c
    if s["state"] != "running":
        break
    time.sleep(0.3)
cs = [seen[k] for k in sorted(seen)]
if not cs:
    raise SystemExit(f"no checkpoint completed with {KEYS} keys")
d = sorted(c["duration_ms"] for c in cs)
p99 = d[min(len(d) - 1, int(round(0.99 * (len(d) - 1))))]
print(f"checkpoints_{KEYS}_keys={len(cs)}")
print(f"checkpoint_p99_ms_{KEYS}_keys={p99}")
print(f"checkpoint_full_bytes_{KEYS}_keys={max(c['full_bytes'] for c in cs)}")
print(f"checkpoint_incremental_bytes_{KEYS}_keys={int(statistics.median(c['incremental_bytes'] for c in cs[1:] or cs))}")
PY
    wait_job "$job" finished 600
  done
}

bench_vs_flink() {
  local n=${N:-5000000} keys=${KEYS:-1000} ev_per_ms=${EV_PER_MS:-10} job pid cpu0 cpu1 rss
  command -v java >/dev/null || { echo "vs-flink needs Java 17 (apt-get install openjdk-17-jre-headless)" >&2; exit 1; }
  [ -x /usr/bin/time ] || { echo "vs-flink needs GNU time (apt-get install time)" >&2; exit 1; }
  log "building release binaries"
  BIN=$(release_bins)
  start_cluster 1 2
  # 1. The events, written once by Eddy's generator: {"seq","k","score","ts_ms"} per line, in the
  # directory the workers let jobs use (--allow-dir).
  local events="$RUN_DIR/files/events.jsonl"
  mkdir -p "$RUN_DIR/files"
  cat >"$RUN_DIR/events.toml" <<SPEC
name = "bench-events"
[state]
checkpoint_interval = "0s"
[[source]]
name = "events"
connector = "generator"
options = { count = $n, keys = $keys, seed = 1, events_per_ms = $ev_per_ms }
[[transform]]
name = "renamed"
input = "events"
select = "seq, k, score, ts AS ts_ms"
[[sink]]
name = "file"
input = "renamed"
connector = "file"
options = { path = "$events" }
SPEC
  log "writing $n events to a file"
  job=$("$BIN/eddy" submit "$RUN_DIR/events.toml")
  wait_job "$job" finished 900
  # 2. Eddy: file -> HOP(10 min, 5 s) SUM per key, RocksDB state, checkpoints every 10 s (as Flink's).
  hop_job "[[source]]
name = \"events\"
connector = \"file\"
options = { path = \"$events\", columns = \"seq BIGINT, k BIGINT, score DOUBLE, ts_ms TIMESTAMP\" }
event_time = { column = \"ts_ms\", allowed_delay = \"1s\" }" 1 10s rocksdb >"$RUN_DIR/eddy.toml"
  pid=${WORKER_PIDS[0]}
  cpu0=$(cpu_seconds "$pid")
  log "Eddy: $n events"
  job=$("$BIN/eddy" submit "$RUN_DIR/eddy.toml")
  wait_job "$job" finished 1800
  cpu1=$(cpu_seconds "$pid")
  rss=$(peak_rss_mb "$pid")
  # 3. Flink 2.3 on the same file, RocksDB state; a run on one event measures its start-up.
  log "Flink: $n events (and a 1-event run for start-up cost)"
  head -n 1 "$events" >"$RUN_DIR/one.jsonl"
  local flink="$ROOT/../shared/bench/flink/run.sh"
  [ -x "$flink" ] || flink=${FLINK_RUN:-}
  [ -n "$flink" ] && [ -e "$flink" ] || { echo "set FLINK_RUN to shared/bench/flink/run.sh" >&2; exit 1; }
  SRC_FILE="$RUN_DIR/one.jsonl" BACKEND=rocksdb CKPT_DIR="$RUN_DIR/flink-ckpt0" /usr/bin/time -v bash "$flink" >"$RUN_DIR/flink0.out" 2>"$RUN_DIR/flink0.time"
  SRC_FILE="$events" BACKEND=rocksdb CKPT_DIR="$RUN_DIR/flink-ckpt" /usr/bin/time -v bash "$flink" >"$RUN_DIR/flink.out" 2>"$RUN_DIR/flink.time"
  python3 - "$n" "$cpu0" "$cpu1" "$rss" "$RUN_DIR" <<'PY'
import re, sys
n, cpu0, cpu1, rss, run = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
def timed(name):
    text = open(f"{run}/{name}.time").read()
    grab = lambda label: float(re.search(label + r":\s*([\d.]+)", text).group(1))
    return grab("User time \\(seconds\\)") + grab("System time \\(seconds\\)"), grab("Maximum resident set size \\(kbytes\\)") / 1024
flink_cpu, flink_rss = timed("flink")
startup_cpu, _ = timed("flink0")
eddy = n / (cpu1 - cpu0)
flink = n / max(flink_cpu - startup_cpu, 1e-9)
print(f"events={n}")
print(f"eddy_cpu_seconds={cpu1 - cpu0:.2f}")
print(f"flink_cpu_seconds={flink_cpu - startup_cpu:.2f}")
print(f"eddy_events_per_cpu_second={eddy:.0f}")
print(f"flink_events_per_cpu_second={flink:.0f}")
print(f"ratio={eddy / flink:.1f}")
print(f"eddy_peak_rss_mb={rss:.1f}")
print(f"flink_peak_rss_mb={flink_rss:.1f}")
print(f"rss_ratio={flink_rss / rss:.1f}")
PY
}

bench_chaos() {
  "$ROOT/scripts/services.sh" start >&2
  eval "$("$ROOT/scripts/services.sh" env)"
  export EDDY_TEST_REDIS_URL=$EDDY_REDIS_URL EDDY_TEST_CLICKHOUSE_URL=$EDDY_CLICKHOUSE_URL EDDY_TEST_PG_URL=$EDDY_PG_URL
  export EDDY_TEST_KAFKA_BROKERS=$EDDY_KAFKA_BROKERS EDDY_TEST_SERVICES_CTL=$ROOT/scripts/services.sh
  # Outages last CHAOS_SECONDS / 8 (60 s in the full run) unless CHAOS_OUTAGE_SECONDS is set.
  export CHAOS_SECONDS=${CHAOS_SECONDS:-600}
  # Shorter than the old events' age, so that their updates and deletes come after it expired.
  export CHAOS_STATE_TTL=${CHAOS_STATE_TTL:-11m}
  local profile=${CHAOS_PROFILE:-debug} flags=() status=0
  [ "$profile" = release ] && flags=(--release)
  log "building $profile binaries"
  [ "$profile" = debug ] && lint_while_building  # the test command's build, reused
  build_bins "$profile" --tests >/dev/null  # with the tests: one feature set, one RocksDB build
  log "chaos run: ${CHAOS_SECONDS}s of writers under faults (progress below; figures on stdout at the end)"
  # The test prints its figures as name=value lines on stdout, progress and mismatches on stderr.
  (cd "$ROOT" && cargo test --quiet "${flags[@]}" --workspace --test chaos -- --nocapture) >"$RUN_DIR/chaos.out" || status=$?
  grep -v -E '^chaos_[a-z_]+=' "$RUN_DIR/chaos.out" >&2 || true
  grep -E '^chaos_[a-z_]+=' "$RUN_DIR/chaos.out" || true
  return "$status"
}

bench_snapshot() {
  local rows=${SNAPSHOT_ROWS:-10000000} chunk_pages=${CHUNK_PAGES:-4096} p job
  "$ROOT/scripts/services.sh" start >&2
  eval "$("$ROOT/scripts/services.sh" env)"
  log "building release binaries"
  BIN=$(release_bins)
  local psql=(psql -X -q -v ON_ERROR_STOP=1 "$EDDY_PG_URL")
  local table=bench_snapshot.events
  local columns="id, content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload"
  if [ "$("${psql[@]}" -Atc "SELECT obj_description('$table'::regclass, 'pg_class')" 2>/dev/null)" != "rows=$rows" ]; then
    log "making $table with $rows rows (once; kept for the next run)"
    "${psql[@]}" >&2 <<SQL
DROP SCHEMA IF EXISTS bench_snapshot CASCADE;
CREATE SCHEMA bench_snapshot;
CREATE TABLE $table (id bigint, content_id uuid, user_id uuid, event_type text, event_ts timestamptz,
                     duration_ms int, device text, raw_payload jsonb);
INSERT INTO $table
SELECT g, md5(g::text)::uuid, md5((g * 7)::text)::uuid, (ARRAY['play', 'pause', 'finish', 'click'])[1 + g % 4],
       timestamptz '2024-05-01 00:00:00+00' + g * interval '10 ms', g % 100000, 'device-' || (g % 5),
       jsonb_build_object('g', g, 'src', 'bench')
FROM generate_series(1, $rows) g;
ALTER TABLE $table REPLICA IDENTITY FULL;
VACUUM ANALYZE $table;
COMMENT ON TABLE $table IS 'rows=$rows';
SQL
  fi
  start_cluster 1 4
  "${psql[@]}" -c "SELECT count(*) FROM $table" >/dev/null # warm the cache as COPY and the jobs find it
  log "COPY of $rows rows"
  local t0 t1
  t0=$(date +%s.%N)
  "${psql[@]}" -c "COPY (SELECT $columns FROM $table) TO STDOUT" >/dev/null
  t1=$(date +%s.%N)
  local copy_rate
  copy_rate=$(python3 -c "print(round($rows / ($t1 - $t0)))")
  echo "copy_rows_per_second=$copy_rate"
  for p in 1 2; do
    cat >"$RUN_DIR/snapshot-p$p.toml" <<SPEC
name = "bench-snapshot-p$p"
[state]
checkpoint_interval = "5s"
[[source]]
name = "events"
connector = "postgres_cdc"
parallelism = $p
[source.options]
url = "$EDDY_PG_URL"
table = "$table"
columns = "id BIGINT, content_id VARCHAR, user_id VARCHAR, event_type VARCHAR, event_ts TIMESTAMP, duration_ms BIGINT, device VARCHAR, raw_payload VARCHAR"
primary_key = ["id"]
slot = "bench_snapshot_p$p"
publication = "bench_snapshot"
version_column = "version"
snapshot_chunk_pages = $chunk_pages
[[sink]]
name = "out"
input = "events"
connector = "discard"
parallelism = $p
SPEC
    "${psql[@]}" -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'bench_snapshot_p$p'" >/dev/null
    log "snapshot at parallelism $p"
    t0=$(date +%s.%N)
    job=$("$BIN/eddy" submit "$RUN_DIR/snapshot-p$p.toml")
    python3 - "$BIN/eddy" "$job" "$rows" "$p" "$t0" "$copy_rate" <<'PY'
import json, subprocess, sys, time
eddy, job, rows, p, t0, copy_rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]), int(sys.argv[6])
deadline = time.time() + 1800
while True:
    s = json.loads(subprocess.run([eddy, "status", job, "--json"], capture_output=True, check=True, text=True).stdout)
    if s["state"] in ("failed", "cancelled"):
        sys.exit(f"job {job} is {s['state']}: {s.get('cause')}")
    tasks = [t["gauges"] for t in s["tasks"] if "snapshot_chunks_total" in t.get("gauges", {})]
    done = sum(g.get("snapshot_rows_done", 0) for g in tasks)
    if done >= rows and all(g.get("snapshot_eta_seconds", 1) == 0 for g in tasks):
        wall = time.time() - t0
        break
    if time.time() > deadline:
        sys.exit(f"the snapshot did not finish: {done} of {rows} rows")
    time.sleep(0.2)
# Each subtask's rate is its rows over the time it spent reading them.
seconds = max(g["snapshot_rows_done"] / g["snapshot_rows_per_second"] for g in tasks if g.get("snapshot_rows_per_second"))
rate = round(done / seconds)
print(f"snapshot_rows_per_second_p{p}={rate}")
print(f"snapshot_wall_seconds_p{p}={wall:.1f}")
print(f"snapshot_vs_copy_p{p}={rate / copy_rate:.2f}")
PY
    "$BIN/eddy" cancel "$job" >/dev/null
  done
  "${psql[@]}" -c "DROP PUBLICATION IF EXISTS bench_snapshot" >/dev/null
}

case $name in
  window) bench_window ;;
  pipeline) bench_pipeline ;;
  recovery) bench_recovery ;;
  checkpoint) bench_checkpoint ;;
  vs-flink) bench_vs_flink ;;
  chaos) bench_chaos ;;
  failover) bench_failover ;;
  snapshot) bench_snapshot ;;
  *) echo "unknown benchmark '$name'; available: window, pipeline, recovery, checkpoint, vs-flink, chaos, failover, snapshot" >&2; exit 2 ;;
esac
