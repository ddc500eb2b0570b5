//! The connectors a spec may name, their options and the schemas they produce. The worker implements
//! them; they are described here so that a spec is fully checked before anything runs.

use std::time::Duration;

use serde::Deserialize;

use crate::{DataType, Field, Schema};

/// A source connector with its checked options.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceConnector {
    /// Deterministic synthetic events.
    Generator(GeneratorOptions),
    /// A PostgreSQL table: initial snapshot, then its changes from logical replication (pgoutput).
    PostgresCdc(PostgresCdcOptions),
    /// A Kafka topic of JSON records, plain or upsert.
    Kafka(KafkaSourceOptions),
    /// A file of newline-delimited JSON objects, read once.
    File(FileSourceOptions),
}

impl SourceConnector {
    /// The connector's name in specs.
    pub fn name(&self) -> &'static str {
        match self {
            SourceConnector::Generator(_) => "generator",
            SourceConnector::PostgresCdc(_) => "postgres_cdc",
            SourceConnector::Kafka(_) => "kafka",
            SourceConnector::File(_) => "file",
        }
    }

    /// What the connector allows, for the planner to check a spec against at submit time.
    /// Every source runs at any parallelism today (the CDC source's extra subtasks read snapshot
    /// chunks, then idle).
    pub fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
}

/// What a connector allows: the planner reads it when a spec is submitted, so a spec the
/// connector cannot run is refused then, with the reason, not when a worker starts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Why the connector runs as one instance whatever the job's parallelism (or a rescale's),
    /// if it does.
    pub single_instance: Option<&'static str>,
}

/// Options of the `file` source.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceOptions {
    /// The file: one JSON object per line; TIMESTAMP fields as epoch milliseconds or ISO 8601.
    pub path: String,
    /// The columns to read, as `name TYPE, …`.
    pub columns: String,
}

/// A sink connector with its checked options.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkConnector {
    /// Newline-delimited JSON, one file per sink subtask.
    File(FileSinkOptions),
    /// Drops every row (for benchmarks).
    Discard,
    /// A Kafka topic, plain or upsert JSON.
    Kafka(KafkaSinkOptions),
    /// A Redis sorted set holding the latest closed window's scores.
    Redis(RedisSinkOptions),
    /// A ClickHouse table (batched inserts).
    ClickHouse(ClickHouseSinkOptions),
    /// An HTTP endpoint: one JSON POST per row, idempotent by key.
    Http(HttpSinkOptions),
}

impl SinkConnector {
    /// The connector's name in specs.
    pub fn name(&self) -> &'static str {
        match self {
            SinkConnector::File(_) => "file",
            SinkConnector::Discard => "discard",
            SinkConnector::Kafka(_) => "kafka",
            SinkConnector::Redis(_) => "redis",
            SinkConnector::ClickHouse(_) => "clickhouse",
            SinkConnector::Http(_) => "http",
        }
    }

    /// What the connector allows, for the planner to check a spec against at submit time.
    pub fn capabilities(&self) -> Capabilities {
        match self {
            SinkConnector::Redis(_) => Capabilities {
                single_instance: Some("the redis sink replaces the whole leaderboard per window, so it runs as one instance (several would replace each other's part of a window)"),
            },
            _ => Capabilities::default(),
        }
    }
}

/// What a source does with a record it cannot decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BadRecordPolicy {
    /// Fail the task (and the job) with the record's error.
    #[default]
    Fail,
    /// Skip it, counting it in the task's `dead_lettered` metric.
    Drop,
    /// Skip it, count it, and append it with its error to the `dead_letter_path` file.
    DeadLetter,
}

/// Options of the `postgres_cdc` source.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresCdcOptions {
    /// `postgres://user@host:port/db` (the user needs the REPLICATION attribute).
    pub url: String,
    /// The table, e.g. `public.engagement_events`.
    pub table: String,
    /// The table's columns as `name TYPE, …` (the output schema, in this order).
    pub columns: String,
    /// Primary-key columns.
    pub primary_key: Vec<String>,
    /// Replication slot, created if missing.
    #[serde(default = "default_slot")]
    pub slot: String,
    /// Publication, created (for `table`) if missing.
    #[serde(default = "default_publication")]
    pub publication: String,
    /// Extra BIGINT output column carrying each change's LSN (a version that grows per row).
    pub version_column: Option<String>,
    /// Read the table's existing rows first (default true).
    #[serde(default = "default_true")]
    pub snapshot: bool,
    /// What a new job (not a restart or a restore) does when `slot` already exists.
    #[serde(default)]
    pub existing_slot: ExistingSlot,
    /// With `event_time` on the source: how often it writes PostgreSQL's clock into the WAL as a
    /// logical message (default `1s`). A message's arrival on the stream says that every
    /// transaction committed before it has been read, so the watermark follows the database's
    /// clock while the table is quiet and stalls while the stream is behind.
    #[serde(default = "one_second", with = "crate::time::duration")]
    pub heartbeat_interval: Duration,
    /// Bytes of WAL the slot may hold back on the server (`pg_current_wal_lsn() -
    /// confirmed_flush_lsn`, the `slot_lag_bytes` figure) before the job fails, naming the lag, so
    /// that a job that stopped keeping up or checkpointing is seen before the disk fills; a
    /// warning is logged past 80 % of it. Default: no bound.
    #[serde(default)]
    pub max_slot_lag_bytes: Option<u64>,
    /// The snapshot is read in chunks of this many of the table's 8 KiB pages (`ctid` ranges,
    /// default 4096 = 32 MiB): a checkpoint records the chunks handed on, so a restart reads only
    /// the others again; with parallelism above 1 a new job's subtasks share them out.
    #[serde(default = "default_chunk_pages")]
    pub snapshot_chunk_pages: u32,
    /// What happens when the table's columns change while the job streams (seen in pgoutput's
    /// relation messages, against the columns the checkpoint holds).
    #[serde(default)]
    pub schema_changes: SchemaChanges,
    /// An extra VARCHAR output column (before `version_column`) holding, as the text of a JSON
    /// object, every column of the table that `columns` does not declare: those it had at the
    /// start and, with `schema_changes = "evolve"`, those added while the job streams, each
    /// value written as a declared column of its type would be. NULL while there are none.
    /// A Kafka sink with `extra_fields` naming it writes them as fields of their own.
    pub extra_columns: Option<String>,
}

/// What a `postgres_cdc` source does when its table gains or loses a column. A rename or a type
/// change fails the job in either case, with the change named: Eddy does not guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SchemaChanges {
    /// Fail, naming the change, when a column it reads is dropped or one it does not read is
    /// added (a column added that `columns` already declares is read from then on).
    #[default]
    Fail,
    /// Carry on: a declared column the table lacks (not yet added, or dropped) reads as NULL, and
    /// its values flow as soon as the table has it; a column added that `columns` does not
    /// declare goes into `extra_columns` if the source has it, and is logged and not read if not.
    Evolve,
}

fn default_chunk_pages() -> u32 {
    4096
}

/// Shortest heartbeat interval a source or sink may be given.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(100);

fn one_second() -> Duration {
    Duration::from_secs(1)
}

/// Checks a heartbeat interval: at least [`MIN_HEARTBEAT`].
fn check_heartbeat(every: Duration) -> Result<(), String> {
    if every < MIN_HEARTBEAT {
        return Err(format!("options.heartbeat_interval: at least {}ms, got {}ms", MIN_HEARTBEAT.as_millis(), every.as_millis()));
    }
    Ok(())
}

/// What a new `postgres_cdc` job does with a replication slot an earlier job left behind. The slot
/// alone does not tell whether that job finished its snapshot, so nothing is guessed by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ExistingSlot {
    /// Refuse to start, naming the slot and these choices.
    #[default]
    Fail,
    /// Stream from the slot's position without a snapshot (right when the earlier job had read
    /// its snapshot completely).
    Resume,
    /// Read the table again (a temporary slot's snapshot), then catch up from the slot's position
    /// with the deletes made meanwhile: right in every case, at the cost of reading every row
    /// again (rows unchanged but for their version are not passed on by an upsert consumer).
    Reread,
}

/// The replication slot of a `postgres_cdc` source that names none.
pub const DEFAULT_SLOT: &str = "eddy_slot";

fn default_slot() -> String {
    DEFAULT_SLOT.into()
}
fn default_publication() -> String {
    "eddy_pub".into()
}
fn default_true() -> bool {
    true
}

/// Record formats on Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum KafkaFormat {
    /// Key `{"pk": …}`, value the row as a JSON object, a null value deletes the key.
    #[default]
    UpsertJson,
    /// Value the row as a JSON object; no key semantics.
    Json,
    /// Value the text of the row's only column, as is (sink only): for pre-serialized payloads.
    Raw,
}

/// Options of the `kafka` source.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceOptions {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    /// Topic.
    pub topic: String,
    /// Consumer group.
    pub group_id: String,
    /// Record format.
    #[serde(default)]
    pub format: KafkaFormat,
    /// The value's fields as `name TYPE, …` (the output schema).
    pub columns: String,
    /// Key fields (upsert format).
    #[serde(default)]
    pub primary_key: Vec<String>,
    /// Where to start without committed offsets: `earliest` (default) or `latest`.
    #[serde(default = "default_earliest")]
    pub start: String,
    /// Malformed records.
    #[serde(default)]
    pub bad_records: BadRecordPolicy,
    /// File for dead-lettered records (with `bad_records = "dead-letter"`).
    pub dead_letter_path: Option<String>,
    /// Upsert format: how long a key's last row is kept after its last write (a duration such as
    /// `1h`); a key not written for that long is forgotten, so its next version retracts nothing.
    /// Kept forever when absent.
    #[serde(default, with = "crate::time::duration::option")]
    pub state_ttl: Option<Duration>,
    /// Upsert format: a BIGINT column that orders each key's versions (the ingest job's LSN). A
    /// record whose version is not above the one held for its key, or above the version of the
    /// key's last tombstone (carried in the tombstone's `version` header), is a replay and changes
    /// nothing; without it every record counts.
    pub version_column: Option<String>,
    /// Follow the watermark heartbeats that the writing job's kafka sink puts into every
    /// partition (its `heartbeat_interval`): the source's watermark is then the lowest heartbeat
    /// of its partitions, it stalls while the writer is down, and `idle_timeout` does not apply.
    /// Heartbeat records are never rows, with or without this.
    #[serde(default)]
    pub heartbeats: bool,
}

impl KafkaSourceOptions {
    /// `state_ttl` in milliseconds (of event time); `None` when absent.
    pub fn state_ttl_ms(&self) -> Option<i64> {
        self.state_ttl.map(|ttl| i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
    }
}

fn default_earliest() -> String {
    "earliest".into()
}

/// Options of the `kafka` sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkOptions {
    /// Bootstrap servers.
    pub brokers: String,
    /// Topic.
    pub topic: String,
    /// Record format.
    #[serde(default)]
    pub format: KafkaFormat,
    /// Key columns (upsert format).
    #[serde(default)]
    pub key: Vec<String>,
    /// Partitions of the topic when the sink creates it (default 4).
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Upsert format: a BIGINT column whose value a tombstone carries in its `version` header,
    /// so that a reader with `version_column` can tell a replayed older record from a newer one.
    pub version_column: Option<String>,
    /// Write the watermark into every partition as a heartbeat record at most this often (e.g.
    /// `1s`), for a downstream kafka source with `heartbeats = true`; none when absent.
    #[serde(default, with = "crate::time::duration::option")]
    pub heartbeat_interval: Option<Duration>,
    /// A VARCHAR column holding a JSON object (a `postgres_cdc` source's `extra_columns`) whose
    /// fields are written as fields of the record, beside the other columns (which win a clash),
    /// instead of as one field; NULL adds none. JSON formats only.
    pub extra_fields: Option<String>,
}

fn default_partitions() -> i32 {
    4
}

/// Options of the `redis` leaderboard sink. Input rows are window results; after each closed
/// window the sorted set holds exactly that window's (member, score) pairs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSinkOptions {
    /// `redis://host:port`.
    pub url: String,
    /// Sorted set name.
    pub key: String,
    /// Column giving the member.
    pub member: String,
    /// Column giving the score.
    pub score: String,
    /// Column giving the window end (default `window_end`).
    #[serde(default = "default_window_end")]
    pub window_end: String,
    /// The slide of the window whose results the sink receives, when its input is a window (set
    /// by the planner, not by the spec): a window end the watermark passed without rows is an
    /// empty window, and the leaderboard is cleared for it.
    #[serde(skip)]
    pub window_slide_ms: Option<i64>,
}

fn default_window_end() -> String {
    "window_end".into()
}

/// Options of the `clickhouse` sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseSinkOptions {
    /// HTTP endpoint, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    /// Database.
    #[serde(default = "default_database")]
    pub database: String,
    /// Table; columns are matched by name.
    pub table: String,
    /// Rows per insert at most.
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
    /// Longest a row waits before its batch is inserted.
    #[serde(default = "one_second", with = "crate::time::duration")]
    pub flush_interval: Duration,
    /// Column that orders versions of a row (ReplacingMergeTree's version).
    pub version_column: Option<String>,
    /// UInt8 column set to 1 on the row that records a retraction (delete).
    pub deleted_column: Option<String>,
    /// File for rows the table cannot hold (a value outside its column's type, or refused by
    /// ClickHouse), one JSON line each; they are counted and logged either way, and the job
    /// carries on.
    pub dead_letter_path: Option<String>,
}

fn default_database() -> String {
    "default".into()
}
fn default_batch_rows() -> usize {
    10_000
}

/// Options of the `http` sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkOptions {
    /// Endpoint receiving one JSON POST per inserted row.
    pub url: String,
    /// Columns sent (default: all).
    pub columns: Option<Vec<String>>,
    /// Columns whose values form the `Idempotency-Key` header, e.g. `["id", "version"]`.
    pub idempotency_key: Vec<String>,
    /// Requests in flight at most.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Per-request timeout.
    #[serde(default = "default_timeout", with = "crate::time::duration")]
    pub timeout: Duration,
    /// How long a row is retried after timeouts, connection errors, 408, 429 and 5xx answers
    /// (backoff with jitter) before it goes to the dead letters.
    #[serde(default = "default_retry_for", with = "crate::time::duration")]
    pub retry_for: Duration,
    /// At most this many retries per row, if set (otherwise `retry_for` alone bounds them).
    pub max_retries: Option<u32>,
    /// File where rows refused with a 4xx, or out of retries, are appended with the error.
    pub dead_letter_path: Option<String>,
    /// Send deletes too: every body gets this boolean field, `true` for a delete (a retraction not
    /// followed by an insert of the same `key`), whose idempotency key carries the delete's
    /// version. Without it only inserted row versions are sent.
    pub deleted_field: Option<String>,
    /// The columns that identify a row across its versions (e.g. `["id"]`), which tell an update's
    /// old row from a delete; required with `deleted_field`.
    #[serde(default)]
    pub key: Vec<String>,
}

fn default_concurrency() -> usize {
    16
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_retry_for() -> Duration {
    Duration::from_secs(300)
}

/// Options of the `postgres` lookup (a LEFT join against a table or view).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresLookupOptions {
    /// `postgres://user@host:port/db`.
    pub url: String,
    /// Table or view looked up.
    pub table: String,
    /// Its key column, compared to the stage's `on` column.
    pub key: String,
    /// Columns brought in, as `name TYPE, …`.
    pub columns: String,
    /// Cached keys at most (found and not found).
    #[serde(default = "default_cache_size")]
    pub cache_size: usize,
    /// How long a cached answer is used.
    #[serde(default = "default_cache_ttl", with = "crate::time::duration")]
    pub cache_ttl: Duration,
}

fn default_cache_size() -> usize {
    100_000
}
fn default_cache_ttl() -> Duration {
    Duration::from_secs(60)
}

/// Parses a column list such as `id BIGINT, name VARCHAR` into a schema.
pub fn parse_columns(text: &str) -> Result<Schema, String> {
    let mut fields: Vec<Field> = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, ty) =
            part.split_once(char::is_whitespace).ok_or_else(|| format!("column `{part}` needs a type, e.g. `{part} BIGINT`"))?;
        let data_type = DataType::parse(ty.trim())
            .ok_or_else(|| format!("column `{name}`: unknown type `{}`; use BIGINT, DOUBLE, VARCHAR, BOOLEAN or TIMESTAMP", ty.trim()))?;
        if fields.iter().any(|f| f.name.eq_ignore_ascii_case(name)) {
            return Err(format!("column `{name}` is listed twice"));
        }
        fields.push(Field::new(name, data_type));
    }
    if fields.is_empty() {
        return Err("expected at least one column, e.g. `id BIGINT, name VARCHAR`".into());
    }
    Ok(Schema::new(fields))
}

fn columns_exist(schema: &Schema, field: &str, names: &[String]) -> Result<(), String> {
    for n in names {
        if schema.index_of(n).is_none() {
            return Err(format!("{field}: unknown column `{n}`; available: {}", schema.names()));
        }
    }
    Ok(())
}

/// Options of the `generator` source. Row `seq` (0, 1, 2, …) has key `k` in `1..=keys` and a whole-number
/// `score` in `0..=100`, both drawn from a hash of (`seed`, `seq`); its event time `ts` is
/// `start_ms + seq / events_per_ms`, minus up to `disorder_ms` (also hashed) to make it out of order.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorOptions {
    /// Rows to produce in total (over all subtasks); unbounded when absent.
    pub count: Option<u64>,
    /// Distinct keys.
    #[serde(default = "default_keys")]
    pub keys: u64,
    /// Seed of the pseudo-random columns.
    #[serde(default)]
    pub seed: u64,
    /// Event-time density: rows per millisecond of event time.
    #[serde(default = "default_events_per_ms")]
    pub events_per_ms: u64,
    /// Event time of row 0, Unix ms.
    #[serde(default)]
    pub start_ms: i64,
    /// Largest backwards shift of a row's event time.
    #[serde(default)]
    pub disorder_ms: u64,
    /// Rows per second over all subtasks; as fast as possible when absent.
    pub rate: Option<u64>,
}

fn default_keys() -> u64 {
    1000
}
fn default_events_per_ms() -> u64 {
    10
}

impl GeneratorOptions {
    /// The rows the generator produces.
    pub fn schema() -> Schema {
        Schema::new(vec![
            Field::new("seq", DataType::Int),
            Field::new("k", DataType::Int),
            Field::new("score", DataType::Float),
            Field::new("ts", DataType::Timestamp),
        ])
    }
}

/// Options of the `file` sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkOptions {
    /// Output path; subtask `i` of a sink with parallelism > 1 writes `<path>.<i>`.
    pub path: String,
    /// Throttle: at most this many rows per second per subtask (for backpressure tests and demos).
    pub rows_per_second: Option<u64>,
}

/// Checks a source's connector name and options; returns the connector and its schema.
pub fn source(name: &str, options: &toml::Table) -> Result<(SourceConnector, Schema), String> {
    match name {
        "file" => {
            let o: FileSourceOptions = decode(options)?;
            if o.path.trim().is_empty() {
                return Err("options.path: must not be empty".into());
            }
            let schema = parse_columns(&o.columns).map_err(|m| format!("options.columns: {m}"))?;
            Ok((SourceConnector::File(o), schema))
        }
        "generator" => {
            let o: GeneratorOptions = decode(options)?;
            if o.keys == 0 {
                return Err("options.keys: must be at least 1".into());
            }
            if o.events_per_ms == 0 {
                return Err("options.events_per_ms: must be at least 1".into());
            }
            if o.rate == Some(0) {
                return Err("options.rate: must be at least 1 row per second (omit it for no limit)".into());
            }
            Ok((SourceConnector::Generator(o), GeneratorOptions::schema()))
        }
        "postgres_cdc" => {
            let o: PostgresCdcOptions = decode(options)?;
            check_url("options.url", &o.url, &["postgres", "postgresql"])?;
            for (field, name) in [("options.slot", &o.slot), ("options.publication", &o.publication)] {
                if !resolved_on_workers(name) && !crate::postgres::plain_identifier(name) {
                    return Err(format!(
                        "{field}: `{name}` must be 1 to 63 lower-case letters, digits or underscores, not starting with a digit"
                    ));
                }
            }
            let mut schema = parse_columns(&o.columns).map_err(|m| format!("options.columns: {m}"))?;
            if o.primary_key.is_empty() {
                return Err("options.primary_key: list the table's primary-key columns, e.g. [\"id\"]".into());
            }
            columns_exist(&schema, "options.primary_key", &o.primary_key)?;
            if let Some(e) = &o.extra_columns {
                if schema.index_of(e).is_some() || o.version_column.as_ref().is_some_and(|v| v.eq_ignore_ascii_case(e)) {
                    return Err(format!(
                        "options.extra_columns: `{e}` is already a column of the output (declared in options.columns, or the version_column); name another, e.g. \"extra\""
                    ));
                }
                schema.fields.push(Field::new(e.clone(), DataType::String));
            }
            if let Some(v) = &o.version_column {
                if schema.index_of(v).is_some() {
                    return Err(format!("options.version_column: `{v}` is already a column of the table"));
                }
                schema.fields.push(Field::new(v.clone(), DataType::Int));
            }
            check_heartbeat(o.heartbeat_interval)?;
            if o.snapshot_chunk_pages == 0 {
                return Err("options.snapshot_chunk_pages: at least 1 (pages of 8 KiB per snapshot chunk)".into());
            }
            Ok((SourceConnector::PostgresCdc(o), schema))
        }
        "kafka" => {
            let o: KafkaSourceOptions = decode(options)?;
            check_brokers(&o.brokers)?;
            let schema = parse_columns(&o.columns).map_err(|m| format!("options.columns: {m}"))?;
            if o.format == KafkaFormat::Raw {
                return Err("options.format: `raw` is for sinks; sources read `upsert-json` or `json`".into());
            }
            if o.format == KafkaFormat::UpsertJson && o.primary_key.is_empty() {
                return Err("options.primary_key: the upsert-json format needs the key's columns, e.g. [\"id\"]".into());
            }
            columns_exist(&schema, "options.primary_key", &o.primary_key)?;
            if !matches!(o.start.as_str(), "earliest" | "latest") {
                return Err(format!("options.start: expected `earliest` or `latest`, got `{}`", o.start));
            }
            if o.bad_records == BadRecordPolicy::DeadLetter && o.dead_letter_path.is_none() {
                return Err("options.dead_letter_path: bad_records = \"dead-letter\" needs a file to write them to".into());
            }
            if let Some(ttl) = o.state_ttl {
                if o.format != KafkaFormat::UpsertJson {
                    return Err("options.state_ttl: only the upsert-json format keeps state; remove it".into());
                }
                if ttl.is_zero() {
                    return Err("options.state_ttl: must be positive, got 0 (omit it to keep keys forever)".into());
                }
            }
            if let Some(v) = &o.version_column {
                check_version_column(&schema, v, &o.primary_key, o.format)?;
            }
            Ok((SourceConnector::Kafka(o), schema))
        }
        other => Err(format!("connector: unknown source connector `{other}`; available: generator, postgres_cdc, kafka")),
    }
}

/// Whether `value` holds a reference resolved on the workers: checked there, once resolved.
fn resolved_on_workers(value: &str) -> bool {
    value.contains("${worker:")
}

/// Checks that `url` is `scheme://host…` with one of `schemes`, quoting it without a password.
fn check_url(field: &str, url: &str, schemes: &[&str]) -> Result<(), String> {
    if resolved_on_workers(url) {
        return Ok(());
    }
    let expected = schemes.iter().map(|s| format!("{s}://")).collect::<Vec<_>>().join(" or ");
    let shown = redact_url(url);
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("{field}: `{shown}` is not a URL; expected {expected}HOST[:PORT]…"));
    };
    if !schemes.iter().any(|s| s.eq_ignore_ascii_case(scheme)) {
        return Err(format!("{field}: `{shown}` has scheme `{scheme}`; expected {expected}…"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("{field}: `{shown}` names no host; expected {expected}HOST[:PORT]…"));
    }
    Ok(())
}

/// `url` with the password of its user info (if any) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rsplit_once('@') {
        Some((user, host)) if user.contains(':') => {
            let name = user.split_once(':').map_or(user, |(n, _)| n);
            format!("{scheme}://{name}:***@{host}{}", &rest[end..])
        }
        _ => url.to_string(),
    }
}

/// Checks a Kafka bootstrap list: `host:port[,host:port…]`.
fn check_brokers(brokers: &str) -> Result<(), String> {
    if resolved_on_workers(brokers) {
        return Ok(());
    }
    for b in brokers.split(',').map(str::trim) {
        let ok = b.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
        if !ok {
            return Err(format!("options.brokers: `{b}` is not HOST:PORT; list the brokers as host:port[,host:port…]"));
        }
    }
    Ok(())
}

/// Checks a Kafka `version_column`: a BIGINT column, not part of the key, in the upsert format.
fn check_version_column(schema: &Schema, column: &str, key: &[String], format: KafkaFormat) -> Result<(), String> {
    if format != KafkaFormat::UpsertJson {
        return Err("options.version_column: only the upsert-json format has versions; remove it".into());
    }
    match schema.index_of(column).map(|i| schema.fields[i].data_type) {
        None => Err(format!("options.version_column: no column `{column}`; columns are {}", schema.names())),
        Some(DataType::Int) if key.iter().any(|k| k == column) => {
            Err(format!("options.version_column: `{column}` is a key column; name the column that orders a key's versions"))
        }
        Some(DataType::Int) => Ok(()),
        Some(other) => Err(format!("options.version_column: `{column}` is {other}; versions must be BIGINT")),
    }
}

/// Checks a sink's connector name and options against its input's schema.
pub fn sink(name: &str, options: &toml::Table, input: &Schema) -> Result<SinkConnector, String> {
    match name {
        "file" => {
            let o: FileSinkOptions = decode(options)?;
            if o.path.trim().is_empty() {
                return Err("options.path: must not be empty".into());
            }
            if o.rows_per_second == Some(0) {
                return Err("options.rows_per_second: must be at least 1 (omit it for no limit)".into());
            }
            Ok(SinkConnector::File(o))
        }
        "discard" | "blackhole" => {
            decode::<Empty>(options)?;
            Ok(SinkConnector::Discard)
        }
        "kafka" => {
            let o: KafkaSinkOptions = decode(options)?;
            check_brokers(&o.brokers)?;
            if o.format == KafkaFormat::UpsertJson && o.key.is_empty() {
                return Err("options.key: the upsert-json format needs key columns, e.g. [\"id\"]".into());
            }
            columns_exist(input, "options.key", &o.key)?;
            if o.format == KafkaFormat::Raw && (input.fields.len() != 1 || input.fields[0].data_type != DataType::String) {
                return Err(format!("options.format: `raw` writes one VARCHAR column as the value; the input has {}", input.names()));
            }
            if let Some(v) = &o.version_column {
                check_version_column(input, v, &o.key, o.format)?;
            }
            if let Some(e) = &o.extra_fields {
                match input.index_of(e).map(|i| input.fields[i].data_type) {
                    _ if o.format == KafkaFormat::Raw => return Err("options.extra_fields: the raw format writes no fields; remove it".into()),
                    Some(DataType::String) if !o.key.iter().any(|k| k.eq_ignore_ascii_case(e)) => {}
                    _ => {
                        return Err(format!(
                            "options.extra_fields: `{e}` must be a VARCHAR column of the input that is not in the key (a postgres_cdc source's extra_columns); the input has {}",
                            input.names()
                        ))
                    }
                }
            }
            o.heartbeat_interval.map(check_heartbeat).transpose()?;
            Ok(SinkConnector::Kafka(o))
        }
        "redis" => {
            let o: RedisSinkOptions = decode(options)?;
            check_url("options.url", &o.url, &["redis", "rediss"])?;
            columns_exist(input, "options", &[o.member.clone(), o.score.clone(), o.window_end.clone()])?;
            Ok(SinkConnector::Redis(o))
        }
        "clickhouse" => {
            let o: ClickHouseSinkOptions = decode(options)?;
            check_url("options.url", &o.url, &["http", "https"])?;
            if o.batch_rows == 0 {
                return Err("options.batch_rows: must be at least 1".into());
            }
            columns_exist(input, "options.version_column", o.version_column.as_slice())?;
            Ok(SinkConnector::ClickHouse(o))
        }
        "http" => {
            let o: HttpSinkOptions = decode(options)?;
            check_url("options.url", &o.url, &["http", "https"])?;
            if o.concurrency == 0 {
                return Err("options.concurrency: must be at least 1".into());
            }
            if o.idempotency_key.is_empty() {
                return Err("options.idempotency_key: name the columns that identify a row version, e.g. [\"id\", \"version\"]".into());
            }
            columns_exist(input, "options.idempotency_key", &o.idempotency_key)?;
            columns_exist(input, "options.columns", o.columns.as_deref().unwrap_or_default())?;
            columns_exist(input, "options.key", &o.key)?;
            if let Some(field) = &o.deleted_field {
                if o.key.is_empty() {
                    return Err("options.key: deleted_field needs the columns that identify a row across versions, e.g. [\"id\"]".into());
                }
                if o.columns.as_ref().map_or(input.index_of(field).is_some(), |c| c.contains(field)) {
                    return Err(format!("options.deleted_field: `{field}` is already a field of the body; choose another name"));
                }
            }
            Ok(SinkConnector::Http(o))
        }
        other => Err(format!("connector: unknown sink connector `{other}`; available: file, discard, kafka, redis, clickhouse, http")),
    }
}

/// Checks a lookup's connector and options; returns them with the looked-up columns.
pub fn lookup(name: &str, options: &toml::Table) -> Result<(PostgresLookupOptions, Schema), String> {
    match name {
        "postgres" => {
            let o: PostgresLookupOptions = decode(options)?;
            check_url("options.url", &o.url, &["postgres", "postgresql"])?;
            table_name("options.table", &o.table)?;
            let schema = parse_columns(&o.columns).map_err(|m| format!("options.columns: {m}"))?;
            Ok((o, schema))
        }
        other => Err(format!("connector: unknown lookup connector `{other}`; available: postgres")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

/// The parts of a PostgreSQL table or view name, `name` or `schema.name`, each a plain identifier,
/// lower-cased as PostgreSQL folds an unquoted one (so quoting them names the same relation):
/// anything else, SQL included, is refused at submit.
pub fn table_name(field: &str, name: &str) -> Result<Vec<String>, String> {
    let parts: Vec<&str> = name.split('.').collect();
    let plain = |p: &str| {
        !p.is_empty() && p.len() <= 63 && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') && !p.as_bytes()[0].is_ascii_digit()
    };
    if parts.len() <= 2 && parts.iter().all(|p| plain(p)) {
        Ok(parts.iter().map(|p| p.to_ascii_lowercase()).collect())
    } else {
        Err(format!(
            "{field}: `{name}` must be a table or view name, `name` or `schema.name`, each 1 to 63 letters, digits or \
             underscores, not starting with a digit (for anything else, create a view with such a name)"
        ))
    }
}

/// Reads a connector's options, naming the option an error is about (`options.timeout: …`).
fn decode<T: serde::de::DeserializeOwned>(options: &toml::Table) -> Result<T, String> {
    toml::Value::Table(options.clone()).try_into().map_err(|e: toml::de::Error| {
        // toml's text for an error inside a table ends with "in `key`".
        let text = e.to_string();
        match text.trim_end().rsplit_once("\nin `") {
            Some((_, key)) => format!("options.{}: {}", key.trim_end_matches('`'), e.message()),
            None => format!("options: {}", e.message()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[test]
    fn a_lookup_table_with_sql_in_it_is_refused_at_submit() {
        let options = |t: &str| table(&format!("url = \"postgres://h/db\"\ntable = {t:?}\nkey = \"id\"\ncolumns = \"slug VARCHAR\""));
        for bad in ["(SELECT usename AS id, passwd AS slug FROM pg_shadow) t", "dim; DROP TABLE x", "a.b.c", "\"Dim\"", ""] {
            let error = lookup("postgres", &options(bad)).err().unwrap_or_else(|| panic!("`{bad}` was accepted"));
            assert!(error.starts_with("options.table: ") && error.contains("must be a table or view name"), "{error}");
        }
        for good in ["content_dim_view", "public.content_dim_view", "Content_Dim"] {
            lookup("postgres", &options(good)).unwrap();
        }
        assert_eq!(table_name("t", "Public.Content_Dim").unwrap(), ["public", "content_dim"], "folded as PostgreSQL folds");
    }

    /// `extra_columns` adds a VARCHAR column before the version; a Kafka sink's `extra_fields`
    /// must name a VARCHAR column outside the key.
    #[test]
    fn an_extra_columns_object_is_one_varchar_column() {
        let cdc = |extra: &str| {
            let options = format!(
                "url = \"postgres://h/db\"\ntable = \"t\"\ncolumns = \"id BIGINT, name VARCHAR\"\nprimary_key = [\"id\"]\n\
                 version_column = \"version\"\nextra_columns = \"{extra}\""
            );
            source("postgres_cdc", &table(&options))
        };
        let (_, schema) = cdc("more").unwrap();
        assert_eq!(schema.names(), "id, name, more, version");
        assert_eq!(schema.fields[2].data_type, DataType::String);
        for taken in ["name", "Version"] {
            assert!(cdc(taken).unwrap_err().contains("options.extra_columns: `"), "{taken}");
        }
        let kafka = |extra: &str| {
            sink("kafka", &table(&format!("brokers = \"h:1\"\ntopic = \"t\"\nkey = [\"id\"]\nextra_fields = \"{extra}\"")), &schema)
        };
        assert!(kafka("more").is_ok());
        for bad in ["version", "id", "nope"] {
            let e = kafka(bad).unwrap_err();
            assert!(e.starts_with("options.extra_fields: ") && e.contains("must be a VARCHAR column"), "{bad}: {e}");
        }
    }

    #[test]
    fn endpoints_are_checked_at_submit() {
        let input = parse_columns("id BIGINT, version BIGINT, name VARCHAR").unwrap();
        let cases = [
            (
                "clickhouse",
                r#"url = "ftp://h:8123"
database = "d"
table = "t""#,
                "options.url: `ftp://h:8123` has scheme `ftp`",
            ),
            (
                "http",
                r#"url = "not a url at all"
columns = ["id"]
idempotency_key = ["id"]"#,
                "options.url: `not a url at all` is not a URL",
            ),
            (
                "redis",
                r#"url = "redis://"
key = "k"
member = "id"
score = "version""#,
                "names no host",
            ),
            (
                "kafka",
                r#"brokers = "localhost"
topic = "t"
key = ["id"]"#,
                "options.brokers: `localhost` is not HOST:PORT",
            ),
            (
                "kafka",
                r#"brokers = "h:1"
topic = "t"
key = ["id"]
version_column = "name""#,
                "options.version_column: `name` is VARCHAR",
            ),
            (
                "kafka",
                r#"brokers = "h:1"
topic = "t"
key = ["id"]
version_column = "id""#,
                "is a key column",
            ),
        ];
        for (connector, options, want) in cases {
            let e = sink(connector, &table(options), &input).err().unwrap_or_default();
            assert!(e.contains(want), "{connector} {options}: {e}");
        }
        let e = sink("clickhouse", &table("url = \"https://u:secret@h\"\ndatabase = \"d\"\ntable = \"t\""), &input);
        assert!(e.is_ok(), "{e:?}");
        let e = sink("clickhouse", &table("url = \"gopher://u:secret@h\"\ndatabase = \"d\"\ntable = \"t\""), &input).unwrap_err();
        assert!(e.contains("gopher://u:***@h") && !e.contains("secret"), "{e}");
    }
}
