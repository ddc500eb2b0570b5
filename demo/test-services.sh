#!/usr/bin/env bash
# Starts and stops the Redis and ClickHouse that the sink integration tests use: loopback only,
# no persistence, data in a private directory. The tests' outage cases call it to stop and restart
# a service (EDDY_TEST_SERVICES_CTL).
#
#   demo/test-services.sh start        # both; prints the environment the tests read
#   demo/test-services.sh stop         # both
#   demo/test-services.sh env          # the environment only
#   demo/test-services.sh stop-redis | start-redis | stop-clickhouse | start-clickhouse
#
# Ports and folder: EDDY_TEST_REDIS_PORT (56390), EDDY_TEST_CLICKHOUSE_PORT (HTTP, 58124; native
# protocol on that + 1000), EDDY_TEST_SERVICES_DIR (${TMPDIR:-/tmp}/eddy-sink-services).
set -euo pipefail

dir=${EDDY_TEST_SERVICES_DIR:-${TMPDIR:-/tmp}/eddy-sink-services}
redis_port=${EDDY_TEST_REDIS_PORT:-56390}
ch_port=${EDDY_TEST_CLICKHOUSE_PORT:-58124}
ch_tcp_port=$((ch_port + 1000))
self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")

wait_for() { # what, command…
    local what=$1; shift
    for _ in $(seq 1 150); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    echo "test-services: $what did not come up; see the logs in $dir" >&2
    return 1
}

stop_pid() { # pid file
    [ -f "$1" ] || return 0
    local pid; pid=$(cat "$1")
    if kill "$pid" 2>/dev/null; then
        # Gone, or a zombie nobody reaps (a container's init may not).
        for _ in $(seq 1 150); do
            [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo Z)" = Z ] && break
            sleep 0.2
        done
    fi
    rm -f "$1"
}

start_redis() {
    mkdir -p "$dir"
    redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
        --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --dir "$dir"
    wait_for "redis on $redis_port" redis-cli -p "$redis_port" ping
}

stop_redis() { stop_pid "$dir/redis.pid"; }

clickhouse_config() {
    local d=$dir/clickhouse
    mkdir -p "$d/data" "$d/tmp" "$d/user_files" "$d/format_schemas"
    cat >"$d/config.xml" <<XML
<?xml version="1.0"?>
<yandex>
    <logger><level>warning</level><log>$d/server.log</log><errorlog>$d/error.log</errorlog><size>10M</size><count>1</count></logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$ch_port</http_port>
    <tcp_port>$ch_tcp_port</tcp_port>
    <max_connections>64</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>20</max_concurrent_queries>
    <mark_cache_size>104857600</mark_cache_size>
    <path>$d/data/</path>
    <tmp_path>$d/tmp/</tmp_path>
    <user_files_path>$d/user_files/</user_files_path>
    <format_schema_path>$d/format_schemas/</format_schema_path>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
</yandex>
XML
    cat >"$d/users.xml" <<'XML'
<?xml version="1.0"?>
<yandex>
    <profiles><default><max_memory_usage>2000000000</max_memory_usage></default></profiles>
    <users><default><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks><profile>default</profile><quota>default</quota></default></users>
    <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors><result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
XML
}

start_clickhouse() {
    clickhouse_config
    (
        cd "$dir/clickhouse"
        nohup clickhouse-server --config-file="$dir/clickhouse/config.xml" >"$dir/clickhouse/stdout.log" 2>&1 &
        echo $! >"$dir/clickhouse.pid"
    )
    wait_for "clickhouse on $ch_port" curl -sf "http://127.0.0.1:$ch_port/ping"
}

stop_clickhouse() { stop_pid "$dir/clickhouse.pid"; }

print_env() {
    echo "export EDDY_TEST_REDIS_URL=redis://127.0.0.1:$redis_port"
    echo "export EDDY_TEST_CLICKHOUSE_URL=http://127.0.0.1:$ch_port"
    echo "export EDDY_TEST_SERVICES_CTL=$self"
}

case ${1:-} in
    start) start_redis; start_clickhouse; print_env ;;
    stop) stop_redis; stop_clickhouse ;;
    env) print_env ;;
    start-redis) start_redis ;;
    stop-redis) stop_redis ;;
    start-clickhouse) start_clickhouse ;;
    stop-clickhouse) stop_clickhouse ;;
    *) sed -n '2,13p' "$0" >&2; exit 2 ;;
esac
