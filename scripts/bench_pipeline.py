#!/usr/bin/env python3
"""The pipeline benchmark (scripts/bench.sh pipeline): end-to-end latency and CDC throughput.

Latency: events are inserted into PostgreSQL at a fixed rate while the ingest and process jobs run;
an event's latency is the time from its commit (PostgreSQL's commit timestamp of the inserting
transaction, `track_commit_timestamp`, which scripts/services.sh turns on) until it is visible in
ClickHouse (polled every 10 ms) or received by the external-API stand-in (which logs the arrival
time of every key). Nothing can see a row before its commit; the generator commits every 100 ms,
and its event_ts (now(), the transaction's start) is up to that much earlier, which earlier runs
of this benchmark counted as latency.

Where the time goes: with the kafka-python package (bench.sh installs it in a venv of its own),
the topic between the two jobs is read back too, and each event's record timestamp (set by the
ingest job's producer when it hands the record over) splits its latency in two: commit to the
topic (`latency_ingest_*`, the CDC source and the Kafka sink) and the topic to ClickHouse or the
external system (`latency_process_*`).

CDC throughput: one transaction inserts N rows; two slots created before it are read to its end
LSN, one by pg_recvlogical (PostgreSQL's own client, discarding the output) and one by a
postgres_cdc -> discard job, timed from start until every change is read.

Prints name=value lines. Expects the environment of scripts/services.sh env, BIN (release
binaries), and RUN_DIR.
"""
import json
import os
import subprocess
import threading
import time
import urllib.request

BIN = os.environ["BIN"]
RUN = os.environ["RUN_DIR"]
PG = os.environ["EDDY_PG_URL"]
CH = os.environ["EDDY_CLICKHOUSE_URL"]
RATE = int(os.environ.get("RATE", "5000"))
SECONDS = int(os.environ.get("SECONDS_", "20"))
CDC_ROWS = int(os.environ.get("CDC_ROWS", "200000"))
NAME = "bench_pipeline"
DB_URL = PG.rsplit("/", 1)[0] + "/" + NAME


def log(msg):
    print(f"==> {msg}", file=os.sys.stderr, flush=True)


def psql(url, sql):
    return subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-Atq", "-c", sql], check=True,
                          capture_output=True, text=True).stdout


def clickhouse(sql):
    req = urllib.request.Request(CH, data=sql.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def eddy(*args, env=None):
    return subprocess.run([f"{BIN}/eddy", *args], check=True, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}).stdout


def status(job):
    return json.loads(eddy("status", job, "--json"))


def wait(what, check, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        if check():
            return
        time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {what}; logs in {RUN}")


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def fresh_databases():
    for slot in (NAME, "bench_cdc_recv", "bench_cdc_eddy"):
        psql(PG, f"SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active")
        wait(f"slot {slot} to be released", lambda: psql(
            PG, f"SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot}' AND active").strip() == "", 10)
        psql(PG, f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}'")
    psql(PG, f"DROP DATABASE IF EXISTS {NAME} WITH (FORCE)")
    psql(PG, f"CREATE DATABASE {NAME}")
    subprocess.run(["psql", DB_URL, "-q", "-v", "ON_ERROR_STOP=1", "-f", "sql/postgres.sql"], check=True)
    clickhouse(f"DROP DATABASE IF EXISTS {NAME}")
    ddl = open("sql/clickhouse.sql").read().replace("EXISTS eddy", f"EXISTS {NAME}").replace("eddy.", f"{NAME}.")
    ddl = "\n".join(l for l in ddl.splitlines() if not l.strip().startswith("--"))
    for stmt in filter(None, (s.strip() for s in ddl.split(";"))):
        clickhouse(stmt)


def latency():
    if psql(DB_URL, "SHOW track_commit_timestamp").strip() != "on":
        raise SystemExit("PostgreSQL does not track commit timestamps: restart it (scripts/services.sh stop postgres; "
                         "scripts/services.sh start) so that it starts with track_commit_timestamp=on")
    mock_port = os.environ["MOCK_PORT"]
    topic = f"{NAME}_{int(time.time())}"
    env = {"EDDY_PG_URL": DB_URL, "EDDY_TOPIC": topic, "EDDY_SLOT": NAME, "EDDY_GROUP": topic,
           "EDDY_CLICKHOUSE_DB": NAME, "EDDY_LEADERBOARD_KEY": NAME,
           "EDDY_EXTERNAL_URL": f"http://127.0.0.1:{mock_port}/events",
           "EDDY_DEAD_LETTERS": f"{RUN}/files/dead.jsonl", "EDDY_HTTP_DEAD_LETTERS": f"{RUN}/files/http-dead.jsonl"}
    jobs = [json.loads(eddy("submit", f"jobs/specs/{s}.toml", "--json", env=env))["job_id"] for s in ("ingest", "process")]
    for job in jobs:
        wait(f"job {job} to run", lambda: status(job)["state"] == "running", 60)
    seen = {}
    stop = threading.Event()

    def poll():
        # Rows reach ClickHouse in per-partition order, not in id order, so poll above the highest
        # id below which every id has been seen (ids are dense: the generator only inserts).
        frontier = 0
        while not stop.is_set():
            rows = clickhouse(f"SELECT id FROM {NAME}.engagement_enriched WHERE id > {frontier} FORMAT TabSeparated")
            now = time.time() * 1000
            for line in rows.split():
                seen.setdefault(int(line), now)
            while frontier + 1 in seen:
                frontier += 1
            time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()

    def generate(seconds, seed):
        out = subprocess.run([f"{BIN}/eddy-datagen", "--pg-url", DB_URL, "--rate", str(RATE), "--seconds", str(seconds),
                              "--updates-pct", "0", "--deletes-pct", "0", "--unknown-pct", "3", "--seed", str(seed)],
                             check=True, capture_output=True, text=True).stdout
        return int(dict(kv.split("=") for kv in out.split())["inserted"])

    # Warm-up (connections, consumer-group join, lookup cache), not measured.
    log(f"warming up for 3 s at {RATE} events/s")
    warm = generate(3, 8)
    wait("the warm-up events to reach ClickHouse", lambda: len(seen) >= warm, 120)
    first_measured = int(psql(DB_URL, "SELECT coalesce(max(id), 0) FROM engagement_events").strip()) + 1
    log(f"inserting {RATE} events/s for {SECONDS} s")
    t0 = time.time()
    inserted = generate(SECONDS, 9)
    elapsed = time.time() - t0
    inserted += warm
    wait("ClickHouse to show every event", lambda: len(seen) >= inserted, 120)
    stop.set()
    poller.join()
    commit = {int(i): float(ms) for i, ms in
              (l.split("|") for l in psql(DB_URL, "SELECT id, extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000 "
                                                  f"FROM engagement_events WHERE id >= {first_measured}").split())}
    ch = [seen[i] - commit[i] for i in commit if i in seen]
    wait("the external system to receive every event",
         lambda: sum(1 for _ in open(f"{RUN}/external.jsonl")) >= inserted, 120)
    http = []
    for line in open(f"{RUN}/external.jsonl"):
        e = json.loads(line)
        i = int(e["key"].split(":")[0])
        if i in commit:
            http.append(e["received_at_ms"] - commit[i])
    for job in jobs:
        eddy("cancel", job)
    hops = breakdown(topic, commit, seen, {int(json.loads(l)["key"].split(":")[0]): json.loads(l)["received_at_ms"]
                                           for l in open(f"{RUN}/external.jsonl")})
    return {
        **hops,
        "rate_events_per_second": round((inserted - warm) / elapsed),
        "latency_events": len(ch),
        "latency_clickhouse_p50_ms": round(percentile(ch, 50)),
        "latency_clickhouse_p99_ms": round(percentile(ch, 99)),
        "latency_http_p50_ms": round(percentile(http, 50)),
        "latency_http_p99_ms": round(percentile(http, 99)),
    }


def breakdown(topic, commit, clickhouse_seen, http_seen):
    """Splits each event's latency at the moment the ingest job produced it into the topic."""
    try:
        from kafka import KafkaConsumer, TopicPartition
    except ImportError:
        log("kafka-python is not installed: no per-hop breakdown")
        return {}
    try:
        produced = read_produced(topic, KafkaConsumer, TopicPartition)
    except Exception as e:  # noqa: BLE001 (the breakdown is extra: the run's figures stand without it)
        log(f"reading the topic back failed: {e}; no per-hop breakdown")
        return {}
    ids = [i for i in commit if i in produced]
    log(f"breakdown: {len(ids)} of {len(commit)} measured events found in the topic")
    if not ids:
        return {}
    out = {}
    for name, values in (("ingest", [produced[i] - commit[i] for i in ids]),
                         ("process_clickhouse", [clickhouse_seen[i] - produced[i] for i in ids if i in clickhouse_seen]),
                         ("process_http", [http_seen[i] - produced[i] for i in ids if i in http_seen])):
        out[f"latency_{name}_p50_ms"] = round(percentile(values, 50))
        out[f"latency_{name}_p99_ms"] = round(percentile(values, 99))
    return out


def read_produced(topic, KafkaConsumer, TopicPartition):
    """Each event's record timestamp in the topic (the first, if replayed); then deletes the topic."""
    consumer = KafkaConsumer(bootstrap_servers=os.environ["EDDY_KAFKA_BROKERS"], api_version=(2, 0, 0),
                             enable_auto_commit=False, consumer_timeout_ms=3000)
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    produced = {}
    for record in consumer:
        try:
            event = json.loads(record.value or b"null")
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("id"), int):
            produced.setdefault(event["id"], record.timestamp)
    consumer.close()
    # The broker keeps topics in memory: leave it as it was.
    try:
        from kafka.admin import KafkaAdminClient
        admin = KafkaAdminClient(bootstrap_servers=os.environ["EDDY_KAFKA_BROKERS"], api_version=(2, 0, 0))
        admin.delete_topics([topic])
        admin.close()
    except Exception as e:  # noqa: BLE001 (a topic left behind only costs the broker memory)
        log(f"could not delete topic {topic}: {e}")
    return produced


def cdc():
    for slot in ("bench_cdc_recv", "bench_cdc_eddy"):
        psql(DB_URL, f"SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')")
    log(f"one transaction of {CDC_ROWS} rows")
    psql(DB_URL, f"""INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)
        SELECT gen_random_uuid(), gen_random_uuid(), 'play', now(), g, 'web', '{{"n": 1}}'::jsonb
        FROM generate_series(1, {CDC_ROWS}) g""")
    end_lsn = psql(DB_URL, "SELECT pg_current_wal_lsn()").strip()
    t0 = time.time()
    subprocess.run(["pg_recvlogical", "-d", DB_URL, "--slot", "bench_cdc_recv", "--start", "--endpos", end_lsn,
                    "-o", "proto_version=1", "-o", "publication_names=eddy_pub", "-f", "/dev/null"], check=True)
    recv = CDC_ROWS / (time.time() - t0)
    spec = f"""
name = "bench-cdc"
[[source]]
name = "events"
connector = "postgres_cdc"
options = {{ url = "{DB_URL}", table = "public.engagement_events", slot = "bench_cdc_eddy", existing_slot = "resume", primary_key = ["id"],
  columns = "id BIGINT, content_id VARCHAR, user_id VARCHAR, event_type VARCHAR, event_ts TIMESTAMP, duration_ms BIGINT, device VARCHAR, raw_payload VARCHAR" }}
[[sink]]
name = "out"
input = "events"
connector = "discard"
"""
    path = f"{RUN}/cdc.toml"
    open(path, "w").write(spec)
    t0 = time.time()
    job = json.loads(eddy("submit", path, "--json"))["job_id"]
    wait("the CDC job to read every change",
         lambda: status(job)["tasks"][0]["records_out"] >= CDC_ROWS, 300)
    eddy_rate = CDC_ROWS / (time.time() - t0)
    eddy("cancel", job)
    return {
        "cdc_changes": CDC_ROWS,
        "cdc_changes_per_second": round(eddy_rate),
        "pg_recvlogical_changes_per_second": round(recv),
        "cdc_vs_pg_recvlogical": round(eddy_rate / recv, 2),
    }


def main():
    fresh_databases()
    results = {**latency(), **cdc()}
    for k, v in results.items():
        print(f"{k}={v}")


if __name__ == "__main__":
    main()
