#!/bin/sh
# Starts PostgreSQL or ClickHouse in a test image as the official images do: the server, then the
# SQL files in /docker-entrypoint-initdb.d once it answers.
set -eu
case $1 in
postgres)
  data=/var/lib/postgresql/data
  mkdir -p /run/postgresql && chown postgres /run/postgresql
  if [ ! -s "$data/PG_VERSION" ]; then
    install -d -o postgres -m 700 "$data" && chown postgres "$data" && chmod 700 "$data"
    su postgres -c "initdb -D $data -U eddy --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8" >/dev/null
    printf 'host all all 0.0.0.0/0 scram-sha-256\nhost replication all 0.0.0.0/0 scram-sha-256\n' >>"$data/pg_hba.conf"
    su postgres -c "pg_ctl -D $data -o '-c listen_addresses=' -w start" >/dev/null
    psql -U eddy -d postgres -qc "ALTER USER eddy PASSWORD 'eddy'" -c "CREATE DATABASE eddy"
    for f in /docker-entrypoint-initdb.d/*.sql; do psql -U eddy -d eddy -q -v ON_ERROR_STOP=1 -f "$f"; done
    su postgres -c "pg_ctl -D $data -w stop" >/dev/null
  fi
  exec su postgres -c "exec postgres -D $data -c listen_addresses='*' -c wal_level=logical -c max_replication_slots=16 -c max_wal_senders=16"
  ;;
clickhouse)
  su clickhouse -s /bin/sh -c "clickhouse-server --config-file=/etc/clickhouse-server/config.xml" &
  server=$!
  until curl -sf http://127.0.0.1:8123/ping >/dev/null; do sleep 0.5; done
  for f in /docker-entrypoint-initdb.d/*.sql; do clickhouse-client --multiquery <"$f"; done
  wait $server
  ;;
esac
