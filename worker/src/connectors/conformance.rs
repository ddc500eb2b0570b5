//! One contract, checked the same way for every sink that writes rows as they are (file,
//! ClickHouse, HTTP, Kafka), each built from spec options through the registry as a job builds it:
//!
//! - what `finish` returns after has reached the outside world (`finish` flushes);
//! - a sink that dies after a checkpoint and is restored from it, then given the rows that followed
//!   the checkpoint again, leaves the outside world as if it had not died (replay is harmless):
//!   every row's latest version, nothing missing, nothing the receiver counts twice.
//!
//! A Kafka topic is read back as the process job reads it, by the upsert source keeping versions:
//! a replayed record must change nothing for that reader. The Redis sink takes window results, not
//! rows, and has its own restore test.

use std::collections::BTreeMap;

use eddy_jobs::{DataType, Field, Row, Schema, TaskId, Value};

use crate::batch::{Batch, Op};
use crate::operator::{ConnectorContext, RestoredState};
use crate::testing::{clickhouse_sql as clickhouse, mock_api_bin, service, temp_dir, MockApi, CLICKHOUSE};

fn schema() -> Schema {
    Schema::new(vec![Field::new("id", DataType::Int), Field::new("version", DataType::Int), Field::new("name", DataType::String)])
}

fn row(id: i64, version: i64) -> Row {
    // An update changes more than the version: a reader may treat a version-only change as none.
    vec![Value::Int(id), Value::Int(version), Value::string(&format!("n{id}v{version}"))]
}

/// Where a sink writes, and how to read back what it holds there: each id's latest version, and
/// whether anything arrived that the receiver would count twice.
enum Outside {
    File(String),
    ClickHouse {
        url: String,
        table: String,
    },
    Http(MockApi),
    /// The topic, read by the upsert source built from these options.
    Kafka(String),
}

impl Outside {
    async fn held(&self) -> (BTreeMap<i64, i64>, bool) {
        let mut latest = BTreeMap::new();
        match self {
            Outside::File(path) => {
                // The file is the changelog: each line once, retractions marked.
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let mut lines = std::collections::HashSet::new();
                let mut doubled = false;
                for line in text.lines() {
                    doubled |= !lines.insert(line);
                    let v: serde_json::Value = serde_json::from_str(line).unwrap();
                    let (id, version) = (v["id"].as_i64().unwrap(), v["version"].as_i64().unwrap());
                    if v["_op"] == "-" {
                        latest.remove(&id);
                    } else {
                        latest.insert(id, version);
                    }
                }
                (latest, doubled)
            }
            Outside::ClickHouse { url, table } => {
                // ReplacingMergeTree keeps one row per id under FINAL: repeats are harmless.
                let text = clickhouse(url, &format!("SELECT id, version FROM default.{table} FINAL WHERE deleted = 0")).await;
                for line in text.lines() {
                    let (id, version) = line.split_once('\t').unwrap();
                    latest.insert(id.parse().unwrap(), version.parse().unwrap());
                }
                (latest, false)
            }
            Outside::Http(mock) => {
                // The receiver deduplicates by key; a key repeated with another body would not be.
                for event in mock.get("/events").await.as_array().unwrap() {
                    let body = &event["body"];
                    let (id, version) = (body["id"].as_i64().unwrap(), body["version"].as_i64().unwrap());
                    let held = latest.entry(id).or_insert(version);
                    *held = (*held).max(version);
                }
                (latest, mock.get("/stats").await["conflicts"] != 0)
            }
            Outside::Kafka(options) => {
                // Each change the reader emits, applied; an insert of the version already held is
                // a replay the reader let through. Every record was acknowledged before this
                // runs, so the reader has read them all once it has stayed quiet for 2 s (its
                // first batch, which waits for partitions and offsets, gets 30 s). Duplicates the
                // sink writes are invisible to that reader, as they are to the process job.
                let options: toml::Table = options.parse().unwrap();
                let (connector, schema) = eddy_jobs::connectors::source("kafka", &options).unwrap();
                let ctx = ConnectorContext::for_test(TaskId { vertex: 0, subtask: 0 }, 1, schema);
                let mut reader = super::source(&connector, ctx).await.unwrap();
                let mut doubled = false;
                let wait = |first: bool| std::time::Duration::from_secs(if first { 30 } else { 2 });
                while let Ok(Some(batch)) = tokio::time::timeout(wait(latest.is_empty()), reader.next_batch()).await.map(Result::unwrap) {
                    for (row, op) in batch.rows.iter().zip(&batch.ops) {
                        let (Value::Int(id), Value::Int(version)) = (&row[0], &row[1]) else { panic!("{row:?}") };
                        match op {
                            Op::Insert => doubled |= latest.insert(*id, *version) == Some(*version),
                            Op::Retract => {
                                latest.remove(id);
                            }
                        }
                    }
                }
                (latest, doubled)
            }
        }
    }
}

/// Runs the contract on one sink, named in a spec as `connector` with `options`.
async fn contract(connector: &str, options: &str, outside: &Outside) {
    let task = TaskId { vertex: 3, subtask: 0 };
    let options: toml::Table = options.parse().unwrap();
    let sink = eddy_jobs::connectors::sink(connector, &options, &schema()).unwrap_or_else(|e| panic!("{connector}: {e}"));
    let context = |restore: Option<(u64, Vec<RestoredState>)>| {
        let mut ctx = ConnectorContext::for_test(task, 1, schema());
        ctx.checkpointing = true;
        ctx.restore = restore;
        ctx
    };

    // Ids 1..=40, checkpointed; then 41..=80 and an update of id 5, and the sink dies.
    let before = Batch::inserts((1..=40).map(|id| row(id, 1)).collect());
    let mut after = Batch::inserts((41..=80).map(|id| row(id, 1)).collect());
    after.push(row(5, 1), Op::Retract);
    after.push(row(5, 2), Op::Insert);
    let mut first = super::sink(&sink, context(None)).await.unwrap();
    first.write(before).await.unwrap();
    let snapshot = first.snapshot(1, temp_dir("conformance").path()).await.unwrap();
    first.checkpoint_complete(1).await.unwrap();
    first.write(after.clone()).await.unwrap();
    drop(first);

    // Restored from checkpoint 1, it is given what followed the checkpoint again.
    let restored = RestoredState { inline: snapshot.inline, files: None };
    let mut second = super::sink(&sink, context(Some((1, vec![restored])))).await.unwrap();
    second.write(after).await.unwrap();
    second.finish().await.unwrap();

    let mut expected: BTreeMap<i64, i64> = (1..=80).map(|id| (id, 1)).collect();
    expected.insert(5, 2);
    let (held, doubled) = outside.held().await;
    assert_eq!(held, expected, "{connector}: what the outside world holds after a restore and a replay");
    assert!(!doubled, "{connector}: the receiver got something twice that it would count twice");
}

#[tokio::test]
async fn file_sink_keeps_the_contract() {
    let dir = temp_dir("conformance-file");
    let path = dir.path().join("out.jsonl").display().to_string();
    contract("file", &format!("path = {path:?}"), &Outside::File(path.clone())).await;
}

#[tokio::test]
async fn clickhouse_sink_keeps_the_contract() {
    let Some(url) = service("EDDY_TEST_CLICKHOUSE_URL", "http://127.0.0.1:PORT") else { return };
    let _server = CLICKHOUSE.lock().await;
    let table = "eddy_test_conformance";
    clickhouse(&url, &format!("DROP TABLE IF EXISTS default.{table}")).await;
    clickhouse(
        &url,
        &format!(
            "CREATE TABLE default.{table} (id Int64, version UInt64, name String, deleted UInt8 DEFAULT 0) \
             ENGINE = ReplacingMergeTree(version) ORDER BY id"
        ),
    )
    .await;
    let options = format!(
        "url = {url:?}\ntable = {table:?}\nbatch_rows = 16\nflush_interval = \"50ms\"\nversion_column = \"version\"\ndeleted_column = \"deleted\""
    );
    contract("clickhouse", &options, &Outside::ClickHouse { url, table: table.into() }).await;
}

#[tokio::test]
async fn http_sink_keeps_the_contract() {
    let Some(bin) = mock_api_bin() else { return };
    let mock = MockApi::start(&bin, &[]).await;
    let options = format!("url = \"{}/events\"\nidempotency_key = [\"id\", \"version\"]\nconcurrency = 4", mock.base);
    contract("http", &options, &Outside::Http(mock)).await;
}

#[tokio::test]
async fn kafka_sink_keeps_the_contract() {
    let Some(brokers) = service("EDDY_TEST_KAFKA_BROKERS", "127.0.0.1:PORT") else { return };
    let topic = format!(
        "conformance_{}_{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
    );
    let common = format!("brokers = {brokers:?}\ntopic = {topic:?}\nformat = \"upsert-json\"\nversion_column = \"version\"");
    let reader = format!(
        "{common}\ngroup_id = {topic:?}\nstart = \"earliest\"\nprimary_key = [\"id\"]\ncolumns = \"id BIGINT, version BIGINT, name VARCHAR\""
    );
    contract("kafka", &format!("{common}\nkey = [\"id\"]\npartitions = 1"), &Outside::Kafka(reader)).await;
}
