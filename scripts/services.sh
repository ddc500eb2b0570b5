#!/usr/bin/env bash
# Starts, stops and reports the real services that Eddy's tests and local runs talk to, all on
# loopback (DESIGN §9):
#
#   postgres    a private PostgreSQL cluster (initdb) with wal_level=logical, schema sql/postgres.sql
#   kafka       the tansu broker (Kafka protocol) with in-memory storage
#   redis       redis-server without persistence
#   clickhouse  clickhouse-server (Debian's 18.16 or newer), schema sql/clickhouse.sql
#   s3          an S3-protocol object store (the s3s-fs crate's server, files under the runtime
#               dir) with bucket `eddy`, for checkpoint storage at s3://eddy/...
#
# Usage: scripts/services.sh start|stop|status|env [postgres|kafka|redis|clickhouse|s3 ...]
# With no service named, the command applies to all five.
#
#   start   installs what is missing (apt packages, the tansu binary), starts every service that
#           is not running yet and waits until each one answers. Running services are left alone.
#   stop    stops the services (a stopped service is left alone).
#   status  prints one line per service, up or down; exits 1 if any is down.
#   env     prints `export` lines with the connection settings the job specs use, for
#           `eval "$(scripts/services.sh env)"`.
#
# Settings (environment):
#   EDDY_CACHE              caches and tools, default $HOME/.cache/eddy
#   EDDY_SERVICES_DIR       runtime dir for data, logs and pid files, default $EDDY_CACHE/services
#   EDDY_PG_PORT            default 55432
#   EDDY_KAFKA_PORT         default 59092
#   EDDY_REDIS_PORT         default 56379
#   EDDY_CLICKHOUSE_HTTP_PORT  default 58123
#   EDDY_CLICKHOUSE_TCP_PORT   default 59000 (native protocol, for clickhouse-client)
#   EDDY_S3_PORT            default 59900
#   EDDY_PG_BIN             directory with initdb/pg_ctl, default /usr/lib/postgresql/15/bin
#   EDDY_PG_DATA            PostgreSQL data dir (see pg_data_dir below for the default)
#   EDDY_SERVICES_TIMEOUT   seconds to wait for a service to answer, default 60
#
# Everything the services write lives under the runtime dir, except PostgreSQL's data dir when
# running as root with a runtime dir the `postgres` user cannot reach (see pg_data_dir).
# PostgreSQL and ClickHouse keep their data across stop/start; Kafka (memory:// storage) and Redis
# (no persistence) start empty. To start afresh, stop everything and delete the runtime dir (and,
# in the root case, the PostgreSQL data dir that $RUN/postgres links to).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EDDY_CACHE=${EDDY_CACHE:-$HOME/.cache/eddy}
RUN=${EDDY_SERVICES_DIR:-$EDDY_CACHE/services}
PG_PORT=${EDDY_PG_PORT:-55432}
KAFKA_PORT=${EDDY_KAFKA_PORT:-59092}
REDIS_PORT=${EDDY_REDIS_PORT:-56379}
CH_HTTP_PORT=${EDDY_CLICKHOUSE_HTTP_PORT:-58123}
CH_TCP_PORT=${EDDY_CLICKHOUSE_TCP_PORT:-59000}
S3_PORT=${EDDY_S3_PORT:-59900}
TIMEOUT=${EDDY_SERVICES_TIMEOUT:-60}
TANSU_VERSION=0.6.0
# tansu-storage 0.6.0's memory:// engine can answer a fetch without records a consumer then
# never reads: from an offset inside a record batch it answers with the batches after it, and
# with two produces in flight on a partition it answers past the batch of the one that has taken
# its offsets but not yet stored them. A job restored from a checkpoint lost the rest of a batch;
# one reading while its ingest job restarted lost a few records. The broker is built with
# scripts/tansu-fetch.patch (the batch that holds the offset first; never past a gap); the patch
# level is part of its path, so a broker built without it is not used again.
TANSU_PATCH=p2
TANSU_STORAGE_SHA256=720d2ed8e6010c70f7f06e5af5a7274ebbf6e42fdcd9e46de542b10dc4d2f35d
TANSU_ROOT=$EDDY_CACHE/tools/tansu-$TANSU_VERSION-$TANSU_PATCH
TANSU=$TANSU_ROOT/bin/tansu
S3S_VERSION=0.12.0
S3S=$EDDY_CACHE/tools/s3s-fs-$S3S_VERSION/bin/s3s-fs
ALL_SERVICES=(postgres kafka redis clickhouse s3)

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'services.sh: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# Helpers

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# True when the pid in file $1 is a live process.
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Fails early, and clearly, when another program already holds the port a service wants.
check_port_free() {
  local name=$1 port=$2 var=$3
  if port_open "$port"; then
    die "$name: port $port on 127.0.0.1 is taken by another program; stop it or set $var"
  fi
}

# Calls "$2" (a readiness check) until it succeeds, for up to $TIMEOUT seconds. Gives up early
# when pid file $3 (optional) names a process that has died. On failure, shows the end of log $4.
wait_until() {
  local name=$1 check=$2 pidfile=${3:-} logfile=$4 i
  for ((i = 0; i < TIMEOUT * 5; i++)); do
    if "$check"; then return 0; fi
    if [ -n "$pidfile" ] && [ -s "$pidfile" ] && ! pid_alive "$pidfile"; then
      tail -n 20 "$logfile" >&2 2>/dev/null || true
      die "$name exited during start-up; see $logfile (and the other logs in $RUN)"
    fi
    sleep 0.2
  done
  tail -n 20 "$logfile" >&2 2>/dev/null || true
  die "$name did not answer within ${TIMEOUT}s; see $logfile (and the other logs in $RUN)"
}

# Sends TERM to the process in pid file $2, waits up to 20 s for it to exit (then KILL), and
# removes the pid file.
stop_pid() {
  local name=$1 pidfile=$2 pid i
  if ! pid_alive "$pidfile"; then
    rm -f "$pidfile"
    echo "$name: not running"
    return 0
  fi
  pid=$(cat "$pidfile")
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name (pid $pid) ignored TERM for 20s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  echo "$name: stopped"
}

# Runs a command as root: directly when we are root, through sudo otherwise.
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root to run: $* (install it yourself, or run as root)"
  fi
}

# Installs the given Debian packages, running apt only when at least one is missing, so a machine
# that has them all pays nothing.
APT_UPDATED=
apt_install() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them with"
  log "installing ${missing[*]}"
  if [ -z "$APT_UPDATED" ]; then
    as_root apt-get update -q
    APT_UPDATED=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
}

# Installs a tool that cargo builds (service, crate, binary, build function) once: a lock keeps
# two concurrent starts from building it twice.
cargo_tool_install() {
  local service=$1 crate=$2 binary=$3 build=$4
  [ -x "$binary" ] && return 0
  command -v cargo >/dev/null || die "$service: cargo is needed to install $crate; install Rust (https://rustup.rs)"
  mkdir -p "$EDDY_CACHE"
  (
    flock 8
    [ -x "$binary" ] || "$build"
  ) 8>"$EDDY_CACHE/$crate-install.lock"
  [ -x "$binary" ] || die "$service: cargo install $crate did not produce $binary"
}

# Build dependencies of crates Eddy uses (librdkafka's cmake build needs curl's headers; RocksDB's
# bindings are generated with libclang; the broker is patched with `patch`), and the tools the
# partition tests build their network namespaces with (`ip`, `iptables`), and `openssl`, which the
# TLS tests make their certificates with; checked once per `start`.
ensure_build_deps() {
  apt_install cmake libcurl4-openssl-dev curl libclang-dev g++ patch iproute2 iptables openssl
}

# ---------------------------------------------------------------------------------------------
# PostgreSQL: a private cluster in the runtime dir, run by pg_ctl.

pg_bin_dir() {
  if [ -n "${EDDY_PG_BIN:-}" ]; then echo "$EDDY_PG_BIN"; return; fi
  if [ -x /usr/lib/postgresql/15/bin/initdb ]; then echo /usr/lib/postgresql/15/bin; return; fi
  local d newest=
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && newest=$d # last in (lexical) glob order: the newest two-digit version
  done
  if [ -n "$newest" ]; then echo "$newest"; return; fi
  if command -v initdb >/dev/null; then dirname "$(command -v initdb)"; return; fi
  echo /usr/lib/postgresql/15/bin
}

# PostgreSQL refuses to run as root. As root we run it as the `postgres` user, who must be able to
# reach the data dir. The default runtime dir sits under $HOME, which is usually private to root,
# so in that case the data dir goes to /var/tmp/eddy-postgres-<hash of the runtime dir> instead,
# with a symlink to it at $RUN/postgres. Other users keep the data dir in $RUN/postgres.
pg_data_dir() {
  if [ -n "${EDDY_PG_DATA:-}" ]; then echo "$EDDY_PG_DATA"; return; fi
  # A cluster made earlier stays where it is (the symlink records the choice).
  if [ -e "$RUN/postgres" ]; then readlink -f "$RUN/postgres"; return; fi
  if [ "$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$RUN" 2>/dev/null; then
    echo "/var/tmp/eddy-postgres-$(printf '%s' "$RUN" | cksum | cut -d' ' -f1)"
  else
    echo "$RUN/postgres"
  fi
}

# Runs a PostgreSQL server program as a user it accepts.
pg_run() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

PG_URL="postgres://eddy@127.0.0.1:$PG_PORT/eddy"

pg_answers() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT" -U eddy -d postgres; }

# True when the cluster's postmaster (first line of postmaster.pid) is alive.
pg_running() {
  local data
  data=$(pg_data_dir)
  [ -s "$data/postmaster.pid" ] && kill -0 "$(head -n 1 "$data/postmaster.pid")" 2>/dev/null
}

pg_up() { pg_running && pg_answers; }

pg_install() {
  if [ ! -x "$(pg_bin_dir)/initdb" ]; then apt_install postgresql; fi
  if ! command -v psql >/dev/null || ! command -v pg_isready >/dev/null; then
    apt_install postgresql-client
  fi
  [ -x "$(pg_bin_dir)/initdb" ] || die "postgres: no initdb in $(pg_bin_dir); set EDDY_PG_BIN"
  if [ "$(id -u)" = 0 ]; then
    getent passwd postgres >/dev/null || die "postgres: running as root needs the 'postgres' user (from the postgresql package)"
  fi
}

pg_start() {
  local bin data logfile=$RUN/postgres.log
  bin=$(pg_bin_dir)
  data=$(pg_data_dir)
  if pg_up; then echo "postgres: already running"; return 0; fi
  check_port_free postgres "$PG_PORT" EDDY_PG_PORT

  if [ ! -s "$data/PG_VERSION" ]; then
    log "postgres: creating a cluster in $data"
    mkdir -p "$data"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$data"; fi
    chmod 700 "$data"
    # The bootstrap superuser is `eddy`: it can log in, replicate and create slots. initdb's
    # --auth=trust covers local connections, host 127.0.0.1/::1, and replication on both.
    pg_run "$bin/initdb" -D "$data" -U eddy --auth=trust -E UTF8 --locale=C.UTF-8 >"$logfile" 2>&1 ||
      die "postgres: initdb failed; see $logfile"
    # Settings that CDC needs, plus durability shortcuts that are fine for a throwaway test
    # cluster (the tests crash Eddy's processes, never this server's machine).
    cat >>"$data/postgresql.conf" <<'EOF'

# --- Eddy test cluster (scripts/services.sh) ---
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20
unix_socket_directories = ''
fsync = off
full_page_writes = off
EOF
  fi
  if [ "$data" != "$RUN/postgres" ] && [ ! -d "$RUN/postgres" ]; then
    ln -sfn "$data" "$RUN/postgres"
  fi

  log "postgres: starting on 127.0.0.1:$PG_PORT"
  # Port and address come from the command line, so changing EDDY_PG_PORT needs no new cluster;
  # so does commit-time tracking, which the pipeline benchmark measures latency from.
  # The log is opened by this shell (as root, the postgres user could not write to $RUN).
  pg_run "$bin/pg_ctl" -D "$data" -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -c track_commit_timestamp=on" \
    -w -t "$TIMEOUT" start >>"$logfile" 2>&1 </dev/null 9>&- ||
    { tail -n 20 "$logfile" >&2; die "postgres did not start; see $logfile"; }
  wait_until postgres pg_answers "" "$logfile"

  # The database and schema (both idempotent, so they also run on a cluster made earlier).
  if [ -z "$(psql -h 127.0.0.1 -p "$PG_PORT" -U eddy -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'eddy'")" ]; then
    psql -h 127.0.0.1 -p "$PG_PORT" -U eddy -d postgres -qc 'CREATE DATABASE eddy'
  fi
  psql "$PG_URL" -v ON_ERROR_STOP=1 -q -f "$ROOT/sql/postgres.sql" >>"$logfile" 2>&1 ||
    { tail -n 20 "$logfile" >&2; die "postgres: applying sql/postgres.sql failed; see $logfile"; }
  echo "postgres: up ($PG_URL)"
}

pg_stop() {
  local data
  data=$(pg_data_dir)
  if ! pg_running; then echo "postgres: not running"; return 0; fi
  pg_run "$(pg_bin_dir)/pg_ctl" -D "$data" -m fast -w -t "$TIMEOUT" stop >>"$RUN/postgres.log" 2>&1 ||
    die "postgres did not stop; see $RUN/postgres.log"
  echo "postgres: stopped"
}

# ---------------------------------------------------------------------------------------------
# Kafka: the tansu broker, with memory:// storage (topics and records vanish on stop).

KAFKA_PID=$RUN/kafka.pid
KAFKA_LOG=$RUN/kafka.log

kafka_answers() { "$TANSU" topic list --broker "tcp://127.0.0.1:$KAFKA_PORT" >/dev/null 2>&1; }
kafka_up() { pid_alive "$KAFKA_PID" && kafka_answers; }

kafka_install() { cargo_tool_install kafka tansu "$TANSU" kafka_build; }

# Builds the patched broker (under the install lock).
kafka_build() {
  log "kafka: installing tansu $TANSU_VERSION ($TANSU_PATCH) into $TANSU_ROOT (a one-off build of several minutes)"
  local src=$EDDY_CACHE/tansu-src crate
  crate=$src/tansu-storage-$TANSU_VERSION.crate
  rm -rf "$src" && mkdir -p "$src"
  curl -sSfL -o "$crate" "https://static.crates.io/crates/tansu-storage/tansu-storage-$TANSU_VERSION.crate" \
    || die "kafka: could not download tansu-storage $TANSU_VERSION from static.crates.io"
  echo "$TANSU_STORAGE_SHA256  $crate" | sha256sum -c --quiet - || die "kafka: tansu-storage $TANSU_VERSION has an unexpected checksum"
  tar -xzf "$crate" -C "$src"
  patch -s -d "$src/tansu-storage-$TANSU_VERSION" -p1 <"$ROOT/scripts/tansu-fetch.patch" \
    || die "kafka: scripts/tansu-fetch.patch does not apply to tansu-storage $TANSU_VERSION"
  # dynostore is the feature behind memory:// storage; without it the broker exits at start.
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore \
    --config "patch.crates-io.tansu-storage.path=\"$src/tansu-storage-$TANSU_VERSION\"" \
    --root "$TANSU_ROOT" --target-dir "$EDDY_CACHE/tansu-target"
}

kafka_start() {
  # A broker left running by an older checkout may be one built without the patch: replace it.
  if kafka_up && [ "$(readlink -f "/proc/$(cat "$KAFKA_PID")/exe" 2>/dev/null)" != "$(readlink -f "$TANSU")" ]; then
    log "kafka: the running broker is not $TANSU; restarting it"
    kafka_stop
  fi
  if kafka_up; then echo "kafka: already running"; return 0; fi
  rm -f "$KAFKA_PID"
  check_port_free kafka "$KAFKA_PORT" EDDY_KAFKA_PORT
  log "kafka: starting tansu on 127.0.0.1:$KAFKA_PORT"
  # setsid: the broker outlives this script and is not hit by Ctrl-C sent to its terminal.
  # It runs in $RUN because tansu reads a .env file from its working directory. Every setting is
  # a flag, so stray LISTENER_URL/STORAGE_ENGINE variables in the environment do not apply either.
  (cd "$RUN" && exec setsid nohup "$TANSU" broker \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine memory://tansu/ \
    --cluster-id eddy \
    >>"$KAFKA_LOG" 2>&1 </dev/null 9>&-) &
  echo $! >"$KAFKA_PID"
  wait_until kafka kafka_answers "$KAFKA_PID" "$KAFKA_LOG"
  echo "kafka: up (127.0.0.1:$KAFKA_PORT)"
}

kafka_stop() { stop_pid kafka "$KAFKA_PID"; }

# ---------------------------------------------------------------------------------------------
# Redis: no persistence, daemonised by redis-server itself.

REDIS_PID=$RUN/redis.pid
REDIS_LOG=$RUN/redis.log

redis_answers() { [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }
redis_up() { pid_alive "$REDIS_PID" && redis_answers; }

redis_install() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return 0
  apt_install redis-server redis-tools
}

redis_start() {
  if redis_up; then echo "redis: already running"; return 0; fi
  rm -f "$REDIS_PID"
  check_port_free redis "$REDIS_PORT" EDDY_REDIS_PORT
  log "redis: starting on 127.0.0.1:$REDIS_PORT"
  mkdir -p "$RUN/redis"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes --save '' --appendonly no \
    --pidfile "$REDIS_PID" --logfile "$REDIS_LOG" --dir "$RUN/redis" 9>&- ||
    die "redis did not start; see $REDIS_LOG"
  wait_until redis redis_answers "$REDIS_PID" "$REDIS_LOG"
  echo "redis: up (redis://127.0.0.1:$REDIS_PORT)"
}

redis_stop() { stop_pid redis "$REDIS_PID"; }

# ---------------------------------------------------------------------------------------------
# ClickHouse: a server with its own minimal config in the runtime dir. The config only uses
# settings that 18.16 knows and current releases still accept (the <yandex> root included).

CH_DIR=$RUN/clickhouse
CH_PID=$RUN/clickhouse.pid
CH_LOG=$RUN/clickhouse.log
CH_URL="http://127.0.0.1:$CH_HTTP_PORT"

ch_answers() { [ "$(curl -s --max-time 2 "$CH_URL/ping" 2>/dev/null)" = "Ok." ]; }
ch_up() { pid_alive "$CH_PID" && ch_answers; }

ch_install() {
  command -v clickhouse-server >/dev/null && command -v clickhouse-client >/dev/null && return 0
  apt_install clickhouse-server clickhouse-client
}

# Writes config.xml and users.xml (on every start, so port changes take effect). Only the HTTP and
# native ports listen; the interserver, MySQL and other ports stay off because they are not set.
ch_write_config() {
  mkdir -p "$CH_DIR/data/tmp" "$CH_DIR/data/user_files" "$CH_DIR/data/format_schemas"
  cat >"$CH_DIR/config.xml" <<EOF
<?xml version="1.0"?>
<!-- Written by scripts/services.sh on every start; edits are lost. -->
<yandex>
    <logger>
        <level>information</level>
        <log>$CH_LOG</log>
        <errorlog>$RUN/clickhouse.err.log</errorlog>
        <size>100M</size>
        <count>2</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$CH_HTTP_PORT</http_port>
    <tcp_port>$CH_TCP_PORT</tcp_port>
    <path>$CH_DIR/data/</path>
    <tmp_path>$CH_DIR/data/tmp/</tmp_path>
    <user_files_path>$CH_DIR/data/user_files/</user_files_path>
    <format_schema_path>$CH_DIR/data/format_schemas/</format_schema_path>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>268435456</mark_cache_size>
    <max_concurrent_queries>100</max_concurrent_queries>
</yandex>
EOF
  cat >"$CH_DIR/users.xml" <<'EOF'
<?xml version="1.0"?>
<!-- Written by scripts/services.sh: user `default`, no password, loopback only. -->
<yandex>
    <profiles>
        <default></default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>127.0.0.1</ip>
                <ip>::1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default></default>
    </quotas>
</yandex>
EOF
}

# Applies a SQL file over HTTP, one statement per request (the HTTP interface takes one at a time).
# Statements are split at ';' after dropping whole-line `--` comments, which is enough for our DDL
# (no ';' inside strings).
ch_apply_sql() {
  local file=$1 stmt
  while IFS= read -r -d ';' stmt || [ -n "${stmt//[[:space:]]/}" ]; do
    [ -n "${stmt//[[:space:]]/}" ] || continue
    curl -sS --fail-with-body "$CH_URL/" --data-binary "$stmt" >>"$RUN/clickhouse-sql.log" 2>&1 ||
      { tail -n 5 "$RUN/clickhouse-sql.log" >&2; die "clickhouse: applying $file failed (statement: ${stmt:0:80}…)"; }
  done < <(sed -e 's/^[[:space:]]*--.*$//' "$file")
}

ch_start() {
  if ch_up; then echo "clickhouse: already running"; return 0; fi
  rm -f "$CH_PID"
  check_port_free clickhouse "$CH_HTTP_PORT" EDDY_CLICKHOUSE_HTTP_PORT
  check_port_free clickhouse "$CH_TCP_PORT" EDDY_CLICKHOUSE_TCP_PORT
  log "clickhouse: starting on 127.0.0.1:$CH_HTTP_PORT (native $CH_TCP_PORT)"
  ch_write_config
  # Backgrounded rather than --daemon, so that errors before its logger starts land in a file.
  setsid nohup clickhouse-server --config-file="$CH_DIR/config.xml" \
    >>"$RUN/clickhouse.stdout.log" 2>&1 </dev/null 9>&- &
  echo $! >"$CH_PID"
  wait_until clickhouse ch_answers "$CH_PID" "$RUN/clickhouse.err.log"
  ch_apply_sql "$ROOT/sql/clickhouse.sql"
  echo "clickhouse: up ($CH_URL)"
}

ch_stop() { stop_pid clickhouse "$CH_PID"; }

# ---------------------------------------------------------------------------------------------
# S3: the s3s-fs server, objects kept as files under the runtime dir (they survive stop/start),
# path-style requests, one access key. Its bucket `eddy` is a folder it serves.

S3_PID=$RUN/s3.pid
S3_LOG=$RUN/s3.log
S3_URL="http://127.0.0.1:$S3_PORT"
S3_ACCESS_KEY=eddy
S3_SECRET_KEY=eddy-local-secret

# Any HTTP answer will do (a request without a signature gets 403).
s3_answers() { [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$S3_URL/" 2>/dev/null)" != 000 ]; }
s3_up() { pid_alive "$S3_PID" && s3_answers; }

s3_install() { cargo_tool_install s3 s3s-fs "$S3S" s3_build; }

# Builds the S3 server (under the install lock).
s3_build() {
  log "s3: installing s3s-fs $S3S_VERSION (a one-off build of a few minutes)"
  cargo install s3s-fs --version "$S3S_VERSION" --locked --features binary \
    --root "$(dirname "$(dirname "$S3S")")" --target-dir "$EDDY_CACHE/s3s-target" >&2
}

s3_start() {
  if s3_up; then echo "s3: already running"; return 0; fi
  rm -f "$S3_PID"
  check_port_free s3 "$S3_PORT" EDDY_S3_PORT
  log "s3: starting s3s-fs on 127.0.0.1:$S3_PORT"
  mkdir -p "$RUN/s3/eddy"
  setsid nohup "$S3S" --host 127.0.0.1 --port "$S3_PORT" --access-key "$S3_ACCESS_KEY" --secret-key "$S3_SECRET_KEY" \
    "$RUN/s3" >>"$S3_LOG" 2>&1 </dev/null 9>&- &
  echo $! >"$S3_PID"
  wait_until s3 s3_answers "$S3_PID" "$S3_LOG"
  echo "s3: up ($S3_URL, bucket eddy)"
}

s3_stop() { stop_pid s3 "$S3_PID"; }

# ---------------------------------------------------------------------------------------------
# Commands

# Maps a service name to its function prefix.
prefix() {
  case $1 in
    postgres) echo pg ;; kafka) echo kafka ;; redis) echo redis ;; clickhouse) echo ch ;; s3) echo s3 ;;
    *) die "unknown service '$1' (known: ${ALL_SERVICES[*]})" ;;
  esac
}

cmd_install() {
  local s
  ensure_build_deps
  for s in "$@"; do "$(prefix "$s")_install"; done
}

cmd_start() {
  local s
  cmd_install "$@"
  for s in "$@"; do "$(prefix "$s")_start"; done
}

cmd_stop() {
  local s
  for s in "$@"; do "$(prefix "$s")_stop"; done
}

cmd_status() {
  local s down=0
  for s in "$@"; do
    if "$(prefix "$s")_up" 2>/dev/null; then
      printf '%-11s up\n' "$s"
    else
      printf '%-11s down\n' "$s"
      down=1
    fi
  done
  return $down
}

cmd_env() {
  cat <<EOF
export EDDY_PG_URL=$PG_URL
export EDDY_KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT
export EDDY_REDIS_URL=redis://127.0.0.1:$REDIS_PORT
export EDDY_CLICKHOUSE_URL=$CH_URL
export EDDY_S3_ENDPOINT=$S3_URL
export EDDY_S3_BUCKET=eddy
export EDDY_S3_ACCESS_KEY=$S3_ACCESS_KEY
export EDDY_S3_SECRET_KEY=$S3_SECRET_KEY
EOF
}

usage() {
  echo "usage: $0 start|stop|status|env|install [postgres|kafka|redis|clickhouse|s3 ...] | paths | test-tools" >&2
  exit 2
}

main() {
  [ $# -ge 1 ] || usage
  local cmd=$1
  shift
  local services=("$@")
  [ ${#services[@]} -gt 0 ] || services=("${ALL_SERVICES[@]}")
  for s in "${services[@]}"; do prefix "$s" >/dev/null; done
  case $cmd in
    env) cmd_env ;;
    # What only the tests use: headless Chromium renders the coordinator's web page.
    test-tools) apt_install chromium ;;
    # Where the installed broker and S3 server are (the compose test copies them into images).
    paths) printf 'export EDDY_TANSU=%q\nexport EDDY_S3S=%q\n' "$TANSU" "$S3S" ;;
    status) cmd_status "${services[@]}" ;;
    start | stop | install)
      mkdir -p "$RUN"
      # One start or stop at a time, so that parallel test runs do not race to start a service.
      # The services are started with fd 9 closed (`9>&-`), or they would hold the lock forever.
      exec 9>"$RUN/.lock"
      flock 9
      "cmd_$cmd" "${services[@]}"
      ;;
    *) usage ;;
  esac
}

main "$@"
