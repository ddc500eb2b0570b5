//! The `clickhouse` sink: batched `INSERT … FORMAT JSONEachRow` over ClickHouse's HTTP interface.
//!
//! Rows go through the `clickhouse` crate's formatted insert (`Client::insert_formatted_with`),
//! which sends pre-rendered bytes, so dynamically typed rows need no Rust row type; the client runs
//! without schema validation and compression, which ClickHouse 18.16 (Debian's) lacks. Before the
//! first insert the sink reads the table's columns and sorting key from `system.columns` and
//! `system.tables`: input columns are matched to table columns by name (input columns the table
//! lacks are dropped, with a warning), and each value is rendered for its column's type — a
//! timestamp becomes Unix seconds for `DateTime` (independent of the server's time zone), an
//! ISO-8601 string for text columns, epoch milliseconds for numbers. NULLs are left out of the row,
//! so the column takes its default (NULL for `Nullable`).
//!
//! Changelog: the table is a `ReplacingMergeTree` ordered by the event key with `version_column`
//! as its version. An insert is written as is (`deleted_column` = 0 when configured). A retraction
//! immediately followed in the same batch by an insert with the same sorting-key values is an
//! update's old image and is skipped; any other retraction is a delete, written as the row with
//! `deleted_column` = 1 and its version + 1, so that it replaces the live row (`SELECT … FINAL
//! WHERE deleted = 0` shows live rows). Without version and deleted columns retractions cannot be
//! represented and are skipped (logged once).
//!
//! One writer task owns the buffer: it inserts when `batch_rows` rows are buffered or when the
//! oldest buffered row has waited `flush_interval`, whether or not more input or watermarks come.
//! `write` hands batches to it through a channel of [`QUEUED_BATCHES`] batches, so at most
//! `batch_rows` + that many batches are held; while an insert is retried the channel fills and
//! `write` waits, which backpressures upstream. Failed inserts are retried under the connectors'
//! shared policy ([`crate::retry`], up to 5 minutes; an outage of ClickHouse loses nothing; re-inserting a batch whose first attempt
//! did land is harmless, as the table deduplicates by key and version), then the task fails with an
//! `external` error; schema errors (a missing table or column, refused credentials) fail at once
//! as the user's. A row the table cannot hold never stops the job: a value outside its column's
//! type (a negative number for `UInt64`, 99,999,999,999 for `Int32`, a time before 1970 for
//! `DateTime`), which ClickHouse would store wrapped around, is caught while rendering; a value
//! ClickHouse refuses to parse is found by splitting the failed insert in halves. Either goes to
//! the dead letters with the reason (`dead_letter_path`, `{"table", "row", "error"}` per line;
//! counted in `dead_lettered`). `finish` inserts what is left. Gauges: `rows_written`, `insert_retries`.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use clickhouse::error::Error as ChError;
use clickhouse::{Client, Compression};
use eddy_jobs::connectors::ClickHouseSinkOptions;
use eddy_jobs::{Row, Schema, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use serde_json::Value as Json;

use crate::batch::{is_update_old_row, Batch, Op};
use crate::error::{Result, TaskError};
use crate::json::json_string;
use crate::operator::{ConnectorContext, DeadLetters, OperatorSnapshot, Sink, Stage};
use crate::retry::Policy;

/// Batches queued between `write` and the writer task.
const QUEUED_BATCHES: usize = 2;
/// Longest an insert may take to send its data, and then to be acknowledged.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
const END_TIMEOUT: Duration = Duration::from_secs(60);

/// ClickHouse exception codes that retrying cannot fix: a schema mismatch, a missing table or
/// database, a syntax error, or refused credentials. The job fails with the user's error.
const PERMANENT_CODES: &[u32] = &[16, 47, 60, 62, 81, 164, 192, 193, 194, 195, 497, 516];
/// Codes by which ClickHouse refuses some rows' values (it cannot parse or convert them): the
/// insert is split until the refused rows are found, and those go to the dead letters.
const ROW_CODES: &[u32] = &[6, 26, 27, 32, 38, 41, 53, 69, 70, 72, 117];

/// What the sink hands its writer.
enum Input {
    Rows(Batch),
    /// Insert everything buffered now, then answer (a checkpoint barrier).
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The ClickHouse sink: a handle on its writer task.
pub struct ClickHouseSink {
    batches: Option<mpsc::Sender<Input>>,
    writer: Option<JoinHandle<Result<()>>>,
}

impl ClickHouseSink {
    /// Checks the options and starts the writer task, which reads the table's layout at once.
    pub fn new(o: &ClickHouseSinkOptions, ctx: ConnectorContext) -> Result<ClickHouseSink> {
        if !o.url.starts_with("http://") {
            return Err(TaskError::user(format!(
                "clickhouse sink: options.url `{}`: expected http://host:port (ClickHouse's HTTP interface; this build has no TLS)",
                eddy_jobs::connectors::redact_url(&o.url)
            )));
        }
        let client = Client::default().with_url(&o.url).with_validation(false).with_compression(Compression::None);
        let writer = Writer {
            client,
            target: format!("{}.{}", quote_identifier(&o.database), quote_identifier(&o.table)),
            o: ClickHouseSinkOptions {
                batch_rows: o.batch_rows.max(1),
                flush_interval: o.flush_interval.max(Duration::from_millis(1)),
                ..o.clone()
            },
            rows_written: 0,
            retries: 0,
            warned_skipped_retractions: false,
            dead_letters: DeadLetters::open("clickhouse sink", o.dead_letter_path.as_deref(), ctx.metrics.clone())?,
            ctx,
        };
        let (tx, rx) = mpsc::channel(QUEUED_BATCHES);
        Ok(ClickHouseSink { batches: Some(tx), writer: Some(tokio::spawn(writer.run(rx))) })
    }

    /// Hands `input` to the writer; `what` names the call in the error after `finish`.
    async fn send(&mut self, input: Input, what: &str) -> Result<()> {
        let Some(batches) = &self.batches else {
            return Err(TaskError::internal(format!("clickhouse sink: {what} after finish")));
        };
        if batches.send(input).await.is_err() {
            return Err(self.stopped().await);
        }
        Ok(())
    }

    /// The writer task stopped early: its error, or the reason it is gone.
    async fn stopped(&mut self) -> TaskError {
        self.batches = None;
        self.writer_outcome().await.err().unwrap_or_else(|| TaskError::internal("clickhouse sink: the writer stopped early"))
    }

    /// The writer task has stopped: its error, or the reason it is gone.
    async fn writer_outcome(&mut self) -> Result<()> {
        let writer = self.writer.take().ok_or_else(|| TaskError::internal("clickhouse sink: used after it finished or failed"))?;
        writer.await.map_err(|e| TaskError::internal(format!("clickhouse sink: the writer task failed: {e}")))?
    }
}

impl Drop for ClickHouseSink {
    fn drop(&mut self) {
        // A cancelled task must not leave its writer running.
        if let Some(handle) = &self.writer {
            handle.abort();
        }
    }
}

#[async_trait]
impl Stage for ClickHouseSink {
    async fn snapshot(&mut self, _id: u64, _scratch: &Path) -> Result<OperatorSnapshot> {
        // Rows before the barrier are not read again after a restore: insert them first.
        let (done, flushed) = tokio::sync::oneshot::channel();
        self.send(Input::Flush(done), "checkpoint").await?;
        if flushed.await.is_err() {
            return Err(self.stopped().await);
        }
        Ok(OperatorSnapshot::default())
    }
}

#[async_trait]
impl Sink for ClickHouseSink {
    async fn write(&mut self, batch: Batch) -> Result<()> {
        self.send(Input::Rows(batch), "write").await
    }

    async fn on_watermark(&mut self, _watermark: i64) -> Result<()> {
        // The writer flushes on its own clock; this only reports its failure promptly.
        if self.writer.as_ref().is_some_and(|w| w.is_finished()) {
            return Err(self.stopped().await);
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<()> {
        // Closing the channel tells the writer to insert what is left and stop.
        self.batches = None;
        self.writer_outcome().await
    }
}

/// How an input row is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowKind {
    /// An inserted row: written as is.
    Live,
    /// A deleted row: flagged deleted, with its version + 1.
    Deleted,
}

/// Which rows of a batch to write, and how: a retraction directly followed by an insert with the
/// same key is an update's old image and is skipped; other retractions are deletes.
fn plan_rows(rows: &[Row], ops: &[Op], key: &[usize]) -> Vec<(usize, RowKind)> {
    (0..ops.len())
        .filter(|&i| !is_update_old_row(rows, ops, i, key))
        .map(|i| (i, if ops[i] == Op::Insert { RowKind::Live } else { RowKind::Deleted }))
        .collect()
}

/// A table column an input column goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Column {
    /// JSON-quoted name.
    name: String,
    kind: ColumnKind,
    /// The ClickHouse type, for messages.
    type_name: String,
    /// The integers the column holds, for integer, `DateTime` (seconds) and `Date` (days) columns:
    /// a value outside them would be stored wrapped around, silently wrong.
    range: Option<(i128, i128)>,
}

impl Column {
    fn new(name: &str, type_name: &str) -> Column {
        let kind = ColumnKind::of(type_name);
        let range = match kind {
            ColumnKind::DateTime => Some((0, u32::MAX as i128)),
            ColumnKind::Date => Some((0, u16::MAX as i128)),
            _ => integer_range(strip_wrappers(type_name)),
        };
        Column { name: json_string(name), kind, type_name: type_name.to_string(), range }
    }

    /// Why `v` cannot be stored in this column as it would be written, if it cannot.
    fn misfit(&self, v: &Value) -> Option<String> {
        // DateTime64's range (ClickHouse 20.1 and later: 1900 to 2299).
        const DATETIME64_MS: (i64, i64) = (-2_208_988_800_000, 10_413_792_000_000 - 1);
        let written: Option<i128> = match (v, self.kind) {
            (Value::Timestamp(ms), ColumnKind::DateTime) => Some(ms.div_euclid(1000) as i128),
            (Value::Timestamp(ms), ColumnKind::Date) => Some(ms.div_euclid(86_400_000) as i128),
            (Value::Timestamp(ms), ColumnKind::DateTime64) => {
                return (*ms < DATETIME64_MS.0 || *ms > DATETIME64_MS.1)
                    .then(|| format!("{} is outside {}'s range (1900 to 2299)", eddy_jobs::time::format_iso8601(*ms), self.type_name));
            }
            (Value::Timestamp(ms), ColumnKind::Number) => Some(*ms as i128),
            (Value::Int(i), ColumnKind::Number | ColumnKind::DateTime | ColumnKind::Date) => Some(*i as i128),
            (Value::Float(f), ColumnKind::Number) if self.range.is_some() => {
                if f.fract() != 0.0 || !f.is_finite() || f.abs() > 1e38 {
                    return Some(format!("{f} is not an integer, as {} needs", self.type_name));
                }
                Some(*f as i128)
            }
            _ => None,
        };
        let (lo, hi) = self.range?;
        let n = written?;
        (n < lo || n > hi).then(|| {
            let shown = match v {
                Value::Timestamp(ms) => eddy_jobs::time::format_iso8601(*ms),
                other => format!("{other:?}"),
            };
            format!("{shown} does not fit {} (from {lo} to {hi})", self.type_name)
        })
    }
}

/// The type inside `Nullable(…)` and `LowCardinality(…)`.
fn strip_wrappers(type_name: &str) -> &str {
    let mut t = type_name.trim();
    for wrapper in ["LowCardinality(", "Nullable("] {
        if let Some(inner) = t.strip_prefix(wrapper).and_then(|r| r.strip_suffix(')')) {
            t = inner.trim();
        }
    }
    t
}

/// The values of ClickHouse's integer types (`UInt64` as far as an input BIGINT reaches).
fn integer_range(base: &str) -> Option<(i128, i128)> {
    Some(match base {
        "UInt8" | "Bool" => (0, u8::MAX as i128),
        "UInt16" => (0, u16::MAX as i128),
        "UInt32" => (0, u32::MAX as i128),
        "UInt64" => (0, u64::MAX as i128),
        "Int8" => (i8::MIN as i128, i8::MAX as i128),
        "Int16" => (i16::MIN as i128, i16::MAX as i128),
        "Int32" => (i32::MIN as i128, i32::MAX as i128),
        "Int64" => (i64::MIN as i128, i64::MAX as i128),
        _ => return None,
    })
}

/// How a value is rendered for a column, by the column's ClickHouse type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColumnKind {
    /// `DateTime`: timestamps as Unix seconds.
    DateTime,
    /// `DateTime64`: timestamps as `YYYY-MM-DD hh:mm:ss[.fff]` (read in the column's time zone).
    DateTime64,
    /// `Date`: timestamps as `YYYY-MM-DD`.
    Date,
    /// Strings, UUIDs, enums: every value as a JSON string; timestamps as ISO-8601 UTC.
    Text,
    /// `Bool`.
    Bool,
    /// Numbers and anything else: values as they are, timestamps as epoch milliseconds.
    Number,
}

impl ColumnKind {
    fn of(type_name: &str) -> ColumnKind {
        let t = strip_wrappers(type_name);
        if t.starts_with("DateTime64") {
            ColumnKind::DateTime64
        } else if t.starts_with("DateTime") {
            ColumnKind::DateTime
        } else if t.starts_with("Date") {
            ColumnKind::Date
        } else if ["String", "FixedString", "UUID", "Enum", "IPv"].iter().any(|p| t.starts_with(p)) {
            ColumnKind::Text
        } else if t == "Bool" {
            ColumnKind::Bool
        } else {
            ColumnKind::Number
        }
    }
}

/// Appends `v` rendered for a column of `kind`; returns false (appending nothing) when the field
/// should be left out: NULL, or a float that JSON cannot hold.
fn write_value(out: &mut String, v: &Value, kind: ColumnKind) -> bool {
    use std::fmt::Write as _;
    // Text columns take every value as a JSON string.
    let q = if kind == ColumnKind::Text { "\"" } else { "" };
    let _ = match v {
        Value::Null => return false,
        Value::Bool(b) if matches!(kind, ColumnKind::Bool | ColumnKind::Text) => write!(out, "{q}{b}{q}"),
        Value::Bool(b) => write!(out, "{}", u8::from(*b)),
        Value::Int(i) => write!(out, "{q}{i}{q}"),
        Value::Float(f) => match serde_json::Number::from_f64(*f) {
            Some(n) => write!(out, "{q}{n}{q}"),
            None => return false,
        },
        Value::String(s) => out.write_str(&json_string(s)),
        Value::Timestamp(ms) => match kind {
            ColumnKind::DateTime => write!(out, "{}", ms.div_euclid(1000)),
            ColumnKind::DateTime64 => write!(out, "\"{}\"", eddy_jobs::time::format_timestamp(*ms)),
            ColumnKind::Date => write!(out, "\"{}\"", &eddy_jobs::time::format_timestamp(*ms)[..10]),
            ColumnKind::Text => write!(out, "\"{}\"", eddy_jobs::time::format_iso8601(*ms)),
            ColumnKind::Bool | ColumnKind::Number => write!(out, "{ms}"),
        },
    };
    true
}

/// Where each input column goes in the table.
#[derive(Debug, Clone)]
struct Layout {
    /// Per input column: the table column, or `None` when the table has no such column.
    columns: Vec<Option<Column>>,
    /// Input columns holding the table's sorting key (what makes two rows the same row).
    key: Vec<usize>,
    /// Input column holding the version.
    version: Option<usize>,
    /// The deleted flag's JSON-quoted table column name.
    deleted: Option<String>,
}

impl Layout {
    /// Matches the input schema to the table's `(name, type)` columns and sorting key.
    fn new(
        schema: &Schema,
        table_columns: &[(String, String)],
        sorting_key: &str,
        version_column: Option<&str>,
        deleted_column: Option<&str>,
        table: &str,
    ) -> Result<Layout> {
        let find = |name: &str| {
            table_columns.iter().find(|(n, _)| n == name).or_else(|| table_columns.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)))
        };
        let deleted = match deleted_column {
            Some(d) => Some(find(d).map(|(n, _)| n.clone()).ok_or_else(|| {
                TaskError::user(format!(
                    "clickhouse sink: options.deleted_column: table {table} has no column `{d}`; add it as UInt8 DEFAULT 0"
                ))
            })?),
            None => None,
        };
        // The deleted flag is the sink's to set.
        let columns = schema
            .fields
            .iter()
            .map(|f| find(&f.name).filter(|(n, _)| deleted.as_ref() != Some(n)).map(|(n, ty)| Column::new(n, ty)))
            .collect();
        let version = match version_column {
            Some(v) => {
                if find(v).is_none() {
                    return Err(TaskError::user(format!(
                        "clickhouse sink: options.version_column: table {table} has no column `{v}`; it should be the ReplacingMergeTree's version"
                    )));
                }
                Some(schema.index_of(v).ok_or_else(|| {
                    TaskError::user(format!(
                        "clickhouse sink: options.version_column: no input column `{v}`; columns are {}",
                        schema.names()
                    ))
                })?)
            }
            None => None,
        };
        let key: Vec<usize> = sorting_key.split(',').filter_map(|k| schema.index_of(k.trim().trim_matches('`'))).collect();
        if key.is_empty() && (version.is_some() || deleted.is_some()) {
            return Err(TaskError::user(format!(
                "clickhouse sink: the sorting key of {table} (`{sorting_key}`) names no input column; the sink needs it to tell updates from deletes (e.g. ORDER BY id)"
            )));
        }
        Ok(Layout { columns, key, version, deleted: deleted.map(|d| json_string(&d)) })
    }

    /// Whether retractions can be written at all.
    fn writes_deletes(&self) -> bool {
        self.version.is_some() || self.deleted.is_some()
    }

    /// Appends one JSONEachRow line; a value its column cannot hold appends nothing and says why.
    fn render(&self, out: &mut String, row: &Row, kind: RowKind) -> std::result::Result<(), String> {
        let start = out.len();
        out.push('{');
        // Every field is followed by a comma; the last one is dropped at the end.
        for (i, (column, value)) in self.columns.iter().zip(row).enumerate() {
            let Some(column) = column else { continue };
            let value = match (kind, value) {
                (RowKind::Deleted, Value::Int(v)) if Some(i) == self.version => Value::Int(v.saturating_add(1)),
                _ => value.clone(),
            };
            if let Some(why) = column.misfit(&value) {
                out.truncate(start);
                return Err(format!("column {}: {why}", column.name));
            }
            let mark = out.len();
            out.push_str(&column.name);
            out.push(':');
            if write_value(out, &value, column.kind) {
                out.push(',');
            } else {
                out.truncate(mark);
            }
        }
        if let Some(deleted) = &self.deleted {
            out.push_str(deleted);
            out.push_str(if kind == RowKind::Deleted { ":1," } else { ":0," });
        }
        if out.ends_with(',') {
            out.pop();
        }
        out.push_str("}\n");
        Ok(())
    }
}

/// `name` as a back-quoted ClickHouse identifier.
fn quote_identifier(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

/// The exception code in a ClickHouse error message (`Code: 60, …`).
fn exception_code(message: &str) -> Option<u32> {
    let rest = &message[message.find("Code: ")? + 6..];
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Whether retrying cannot help.
fn permanent(e: &ChError) -> bool {
    match e {
        ChError::BadResponse(message) => exception_code(message).is_some_and(|c| PERMANENT_CODES.contains(&c)),
        ChError::InvalidParams(_) | ChError::Unsupported(_) => true,
        _ => false,
    }
}

/// Whether ClickHouse refused values of the rows sent (not the table or the request).
fn refuses_rows(e: &ChError) -> bool {
    matches!(e, ChError::BadResponse(message) if exception_code(message).is_some_and(|c| ROW_CODES.contains(&c)))
}

/// Rows rendered and waiting for their insert.
#[derive(Default)]
struct Buffer {
    text: String,
    rows: usize,
    /// When the oldest buffered row arrived.
    since: Option<Instant>,
}

/// The task that owns the buffer and talks to ClickHouse.
struct Writer {
    client: Client,
    /// `` `db`.`table` ``.
    target: String,
    /// The options, with `batch_rows` and `flush_interval` at least 1.
    o: ClickHouseSinkOptions,
    rows_written: u64,
    retries: u64,
    warned_skipped_retractions: bool,
    dead_letters: DeadLetters,
    ctx: ConnectorContext,
}

impl Writer {
    async fn run(mut self, mut batches: mpsc::Receiver<Input>) -> Result<()> {
        let layout = self.load_layout().await?;
        let mut buffer = Buffer::default();
        loop {
            let due = buffer.since.map(|t| t + self.o.flush_interval);
            tokio::select! {
                biased;
                // The oldest row has waited flush_interval: insert even while input keeps coming.
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    self.flush(&mut buffer).await?;
                }
                // Input; a closed channel is `finish` (or a dropped sink): insert the rest and stop.
                batch = batches.recv() => match batch {
                    Some(Input::Rows(batch)) => self.add(&layout, &mut buffer, batch).await?,
                    Some(Input::Flush(done)) => {
                        self.flush(&mut buffer).await?;
                        let _ = done.send(());
                    }
                    None => return self.flush(&mut buffer).await,
                },
            }
        }
    }

    /// Renders a batch into the buffer, inserting whenever `batch_rows` rows are buffered.
    async fn add(&mut self, layout: &Layout, buffer: &mut Buffer, batch: Batch) -> Result<()> {
        for (i, kind) in plan_rows(&batch.rows, &batch.ops, &layout.key) {
            if kind == RowKind::Deleted && !layout.writes_deletes() {
                if !self.warned_skipped_retractions {
                    self.warned_skipped_retractions = true;
                    tracing::warn!(job_id = %self.ctx.job_id, task = %self.ctx.task, table = %self.target, "clickhouse sink: retractions are skipped: set version_column and/or deleted_column to write deletes");
                }
                continue;
            }
            if let Err(why) = layout.render(&mut buffer.text, &batch.rows[i], kind) {
                let row = Json::Object(crate::json::row_to_json(&self.ctx.schema, &batch.rows[i], None));
                self.dead_letter(&row.to_string(), &why)?;
                continue;
            }
            buffer.rows += 1;
            buffer.since.get_or_insert_with(Instant::now);
            if buffer.rows >= self.o.batch_rows {
                self.flush(buffer).await?;
            }
        }
        Ok(())
    }

    /// Inserts the buffered rows, retrying until they are in or the budget is spent. Rows whose
    /// values ClickHouse refuses are found by splitting the insert in halves (an insert that fails
    /// to parse stores nothing) and go to the dead letters; the others are inserted.
    async fn flush(&mut self, buffer: &mut Buffer) -> Result<()> {
        if buffer.rows == 0 {
            return Ok(());
        }
        let mut body = std::mem::take(&mut buffer.text);
        let mut refused = 0;
        if let Some(error) = self.insert(&body).await? {
            // JSON escapes newlines inside strings: every line is one row.
            let rows: Vec<&str> = body.split_inclusive('\n').collect();
            let mut parts = vec![(rows.as_slice(), error)];
            while let Some((part, error)) = parts.pop() {
                if let [row] = part {
                    self.dead_letter(row.trim_end(), &error)?;
                    refused += 1;
                    continue;
                }
                let (left, right) = part.split_at(part.len() / 2);
                for half in [right, left] {
                    if let Some(error) = self.insert(&half.concat()).await? {
                        parts.push((half, error));
                    }
                }
            }
        }
        self.rows_written += (buffer.rows - refused) as u64;
        self.ctx.metrics.set_gauge("rows_written", self.rows_written as i64);
        tracing::debug!(job_id = %self.ctx.job_id, task = %self.ctx.task, table = %self.target, rows = buffer.rows, refused, "clickhouse sink: inserted");
        body.clear();
        *buffer = Buffer { text: body, ..Buffer::default() };
        Ok(())
    }

    /// One insert of `body`, retried while ClickHouse is unreachable; `Some(error)` when it refused
    /// values of the rows.
    async fn insert(&mut self, body: &str) -> Result<Option<String>> {
        let sql = format!("INSERT INTO {} FORMAT JSONEachRow", self.target);
        let client = self.client.clone();
        self.retrying("insert", || {
            let mut insert = client.insert_formatted_with(sql.clone()).with_timeouts(Some(SEND_TIMEOUT), Some(END_TIMEOUT));
            let data = body.to_string().into_bytes();
            async move {
                let sent = match insert.send(data.into()).await {
                    Ok(()) => insert.end().await,
                    Err(e) => Err(e),
                };
                match sent {
                    Ok(()) => Ok(None),
                    Err(e) if refuses_rows(&e) => Ok(Some(e.to_string())),
                    Err(e) => Err(e),
                }
            }
        })
        .await
    }

    /// A row the table cannot hold: to the dead letters, with why.
    fn dead_letter(&self, row: &str, why: &str) -> Result<()> {
        tracing::warn!(job_id = %self.ctx.job_id, task = %self.ctx.task, table = %self.target, error = %why, "clickhouse sink: row dead-lettered");
        self.dead_letters.record(&format!("{{\"table\":{},\"row\":{row},\"error\":{}}}", json_string(&self.target), json_string(why)))
    }

    /// Reads the table's columns and sorting key and matches them to the input.
    async fn load_layout(&mut self) -> Result<Layout> {
        let columns =
            self.select("reading the table's columns", "SELECT name, type FROM system.columns WHERE database = ? AND table = ?").await?;
        let columns: Vec<(String, String)> =
            columns.lines().filter_map(|line| line.split_once('\t')).map(|(name, ty)| (unescape_tsv(name), unescape_tsv(ty))).collect();
        if columns.is_empty() {
            return Err(TaskError::user(format!(
                "clickhouse sink: table {} does not exist; create it first (a ReplacingMergeTree ordered by the event id, with the version column)",
                self.target
            )));
        }
        let sorting_key =
            self.select("reading the table's sorting key", "SELECT sorting_key FROM system.tables WHERE database = ? AND name = ?").await?;
        let sorting_key = unescape_tsv(sorting_key.trim_end_matches('\n'));
        let (o, schema) = (&self.o, &self.ctx.schema);
        let layout = Layout::new(schema, &columns, &sorting_key, o.version_column.as_deref(), o.deleted_column.as_deref(), &self.target)?;
        let dropped: Vec<&str> = schema
            .fields
            .iter()
            .zip(&layout.columns)
            .filter(|(f, c)| c.is_none() && o.deleted_column.as_deref().is_none_or(|d| !f.name.eq_ignore_ascii_case(d)))
            .map(|(f, _)| f.name.as_str())
            .collect();
        if !dropped.is_empty() {
            tracing::warn!(job_id = %self.ctx.job_id, task = %self.ctx.task, table = %self.target, columns = %dropped.join(", "), "clickhouse sink: input columns missing from the table are not written");
        }
        tracing::info!(job_id = %self.ctx.job_id, task = %self.ctx.task, table = %self.target, sorting_key = %sorting_key, "clickhouse sink: table layout read");
        Ok(layout)
    }

    /// Runs `sql` on the table's layout (its `?`s bound to the database and table), retried, and
    /// returns its TabSeparated output.
    async fn select(&mut self, what: &str, sql: &str) -> Result<String> {
        let (client, database, table) = (self.client.clone(), self.o.database.clone(), self.o.table.clone());
        let bytes = self
            .retrying(what, || {
                let query = client.query(sql).bind(database.as_str()).bind(table.as_str());
                async move { query.fetch_bytes("TabSeparated")?.collect().await }
            })
            .await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Runs `attempt` until it succeeds, fails permanently (the user's error), or has failed for
    /// longer than the shared retry policy allows (an external error).
    async fn retrying<T, F, Fut>(&mut self, what: &str, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = clickhouse::error::Result<T>>,
    {
        let mut retry = Policy::DEFAULT.start_reporting(&self.ctx.metrics, "clickhouse sink");
        loop {
            match attempt().await {
                Ok(v) => {
                    if retry.failures() > 0 {
                        tracing::info!(job_id = %self.ctx.job_id, task = %self.ctx.task, table = %self.target, attempt = retry.failures(), "clickhouse sink: {what} succeeded again");
                    }
                    return Ok(v);
                }
                Err(e) if permanent(&e) => {
                    return Err(TaskError::user(format!("clickhouse sink: {what} into {}: {e}", self.target)));
                }
                Err(e) => {
                    let Some(delay) = retry.next_delay_after(&format_args!("{what} into {}: {e}", self.target)) else {
                        return Err(TaskError::external(format!(
                            "clickhouse sink: {what} into {} kept failing for {}s ({} retries): {e}; check that ClickHouse is up",
                            self.target,
                            retry.elapsed().as_secs(),
                            retry.failures()
                        )));
                    };
                    self.retries += 1;
                    self.ctx.metrics.set_gauge("insert_retries", self.retries as i64);
                    tracing::warn!(job_id = %self.ctx.job_id, task = %self.ctx.task, table = %self.target, attempt = retry.failures(), error = %e, ?delay, "clickhouse sink: {what} failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// Undoes TabSeparated escaping (`\t`, `\n`, `\\`, `\'`).
fn unescape_tsv(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        out.push(match c {
            '\\' => match chars.next() {
                Some('t') => '\t',
                Some('n') => '\n',
                Some('0') => '\0',
                Some(other) => other,
                None => '\\',
            },
            c => c,
        });
    }
    out
}

#[cfg(test)]
mod tests {

    use eddy_jobs::{DataType, Field, TaskId};

    use super::*;

    fn schema() -> Schema {
        Schema::new(vec![
            Field::new("id", DataType::Int),
            Field::new("event_ts", DataType::Timestamp),
            Field::new("duration_ms", DataType::Int),
            Field::new("event_type", DataType::String),
            Field::new("engagement_pct", DataType::Float),
            Field::new("lsn", DataType::Int),
            Field::new("not_in_table", DataType::String),
        ])
    }

    fn table_columns() -> Vec<(String, String)> {
        [
            ("id", "Int64"),
            ("event_ts", "DateTime"),
            ("duration_ms", "Nullable(Int64)"),
            ("event_type", "LowCardinality(String)"),
            ("engagement_pct", "Nullable(Float64)"),
            ("lsn", "UInt64"),
            ("deleted", "UInt8"),
        ]
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect()
    }

    fn event(id: i64, duration: Option<i64>, lsn: i64) -> Row {
        vec![
            Value::Int(id),
            Value::Timestamp(1_714_566_896_789),
            duration.map_or(Value::Null, Value::Int),
            Value::string("play"),
            Value::Float(0.5),
            Value::Int(lsn),
            Value::string("x"),
        ]
    }

    fn layout() -> Layout {
        Layout::new(&schema(), &table_columns(), "id", Some("lsn"), Some("deleted"), "t").unwrap()
    }

    #[test]
    fn update_images_are_skipped_and_other_retractions_are_deletes() {
        use Op::{Insert as I, Retract as R};
        let rows =
            vec![event(1, Some(10), 5), event(1, Some(20), 9), event(2, None, 3), event(3, None, 4), event(4, None, 8), event(5, None, 1)];
        // 0-1: update of id 1 (old image skipped); 2: delete of id 2 followed by an insert of
        // another id (id 3), which stays a delete; 4: a trailing retraction is a delete.
        let ops = vec![R, I, R, I, I, R];
        let planned = plan_rows(&rows, &ops, &[0]);
        assert_eq!(planned, vec![(1, RowKind::Live), (2, RowKind::Deleted), (3, RowKind::Live), (4, RowKind::Live), (5, RowKind::Deleted)]);
    }

    #[test]
    fn rows_render_for_their_column_types() {
        let l = layout();
        assert_eq!(l.key, vec![0]);
        assert_eq!(l.version, Some(5));
        let mut out = String::new();
        l.render(&mut out, &event(7, Some(1500), 41), RowKind::Live).unwrap();
        assert_eq!(
            out,
            "{\"id\":7,\"event_ts\":1714566896,\"duration_ms\":1500,\"event_type\":\"play\",\"engagement_pct\":0.5,\"lsn\":41,\"deleted\":0}\n"
        );
        out.clear();
        // A delete: NULL left out, version + 1, flagged.
        l.render(&mut out, &event(7, None, 41), RowKind::Deleted).unwrap();
        assert_eq!(out, "{\"id\":7,\"event_ts\":1714566896,\"event_type\":\"play\",\"engagement_pct\":0.5,\"lsn\":42,\"deleted\":1}\n");
    }

    #[test]
    fn values_render_per_kind() {
        let render = |v: Value, k: ColumnKind| {
            let mut s = String::new();
            write_value(&mut s, &v, k).then_some(s)
        };
        let ts = Value::Timestamp(1_714_566_896_789);
        assert_eq!(render(ts.clone(), ColumnKind::DateTime).as_deref(), Some("1714566896"));
        assert_eq!(render(Value::Timestamp(-1), ColumnKind::DateTime).as_deref(), Some("-1"));
        assert_eq!(render(ts.clone(), ColumnKind::DateTime64).as_deref(), Some("\"2024-05-01 12:34:56.789\""));
        assert_eq!(render(ts.clone(), ColumnKind::Date).as_deref(), Some("\"2024-05-01\""));
        assert_eq!(render(ts.clone(), ColumnKind::Text).as_deref(), Some("\"2024-05-01T12:34:56.789Z\""));
        assert_eq!(render(ts, ColumnKind::Number).as_deref(), Some("1714566896789"));
        assert_eq!(render(Value::Bool(true), ColumnKind::Number).as_deref(), Some("1"));
        assert_eq!(render(Value::Bool(false), ColumnKind::Bool).as_deref(), Some("false"));
        assert_eq!(render(Value::Int(5), ColumnKind::Text).as_deref(), Some("\"5\""));
        assert_eq!(render(Value::Float(0.25), ColumnKind::Number).as_deref(), Some("0.25"));
        assert_eq!(render(Value::Float(f64::INFINITY), ColumnKind::Number), None);
        assert_eq!(render(Value::Null, ColumnKind::Text), None);
        assert_eq!(render(Value::string("a\"b"), ColumnKind::Text).as_deref(), Some("\"a\\\"b\""));
        assert_eq!(ColumnKind::of("Nullable(DateTime)"), ColumnKind::DateTime);
        assert_eq!(ColumnKind::of("DateTime('UTC')"), ColumnKind::DateTime);
        assert_eq!(ColumnKind::of("DateTime64(3, 'UTC')"), ColumnKind::DateTime64);
        assert_eq!(ColumnKind::of("LowCardinality(Nullable(String))"), ColumnKind::Text);
        assert_eq!(ColumnKind::of("Enum8('a' = 1)"), ColumnKind::Text);
        assert_eq!(ColumnKind::of("UInt8"), ColumnKind::Number);
    }

    #[test]
    fn values_outside_their_column_are_caught_not_wrapped() {
        let misfit = |ty: &str, v: Value| Column::new("c", ty).misfit(&v);
        assert!(misfit("UInt64", Value::Int(-5)).unwrap().contains("does not fit UInt64"));
        assert!(misfit("Nullable(Int32)", Value::Int(99_999_999_999)).is_some());
        assert_eq!(misfit("Nullable(Int32)", Value::Int(-2_147_483_648)), None);
        assert_eq!(misfit("Int64", Value::Int(i64::MIN)), None);
        assert!(misfit("UInt8", Value::Float(1.5)).unwrap().contains("not an integer"));
        assert_eq!(misfit("Float64", Value::Float(-1.5)), None);
        // 1900 and 2200 do not fit DateTime (1970 to 2106); they would be stored as other dates.
        let e = misfit("DateTime", Value::Timestamp(-2_208_988_800_000)).unwrap();
        assert!(e.contains("1900-01-01T00:00:00.000Z") && e.contains("DateTime"), "{e}");
        assert!(misfit("DateTime('UTC')", Value::Timestamp(7_258_118_400_000)).is_some());
        assert_eq!(misfit("DateTime", Value::Timestamp(1_714_566_896_789)), None);
        assert!(misfit("Date", Value::Timestamp(-86_400_000)).is_some());
        assert!(misfit("DateTime64(3)", Value::Timestamp(-2_208_988_800_001)).is_some());
        assert_eq!(misfit("String", Value::Int(-5)), None);
        assert_eq!(misfit("UInt64", Value::Null), None, "NULL takes the column's default");

        // A row with such a value renders nothing and says which column.
        let mut out = String::from("kept\n");
        let e = layout().render(&mut out, &event(7, Some(1), -5), RowKind::Live).unwrap_err();
        assert!(e.contains("\"lsn\"") && e.contains("-5"), "{e}");
        assert_eq!(out, "kept\n");
    }

    #[test]
    fn layout_errors_say_what_to_fix() {
        let e = Layout::new(&schema(), &table_columns(), "id", Some("lsn"), Some("is_deleted"), "t").unwrap_err();
        assert!(e.message.contains("is_deleted"), "{}", e.message);
        let e = Layout::new(&schema(), &table_columns(), "toDate(event_ts)", Some("lsn"), None, "t").unwrap_err();
        assert!(e.message.contains("sorting key"), "{}", e.message);
        // Without version or deleted columns no key is needed (append-only).
        let l = Layout::new(&schema(), &table_columns(), "", None, None, "t").unwrap();
        assert!(!l.writes_deletes());
    }

    #[test]
    fn error_classification() {
        assert_eq!(exception_code("Code: 60, e.displayText() = DB::Exception: Table default.x doesn't exist."), Some(60));
        assert!(permanent(&ChError::BadResponse("Code: 60, e.displayText() = DB::Exception: Table default.x doesn't exist.".into())));
        let parse = ChError::BadResponse("Code: 27, e.displayText() = DB::Exception: Cannot parse input".into());
        assert!(!permanent(&parse) && refuses_rows(&parse), "a value it cannot parse is the row's fault");
        assert!(!permanent(&ChError::BadResponse("Code: 252, e.displayText() = DB::Exception: Too many parts".into())));
        assert!(!permanent(&ChError::TimedOut));
        assert!(!permanent(&ChError::Network("connection refused".into())));
        assert_eq!(quote_identifier("we`ird"), "`we\\`ird`");
        assert_eq!(unescape_tsv("a\\tb\\\\c"), "a\tb\\c");
    }

    // ---- Integration tests against a real ClickHouse (EDDY_TEST_CLICKHOUSE_URL). ----

    use crate::testing::{clickhouse_sql as sql, CLICKHOUSE as SERVER};

    fn clickhouse_url() -> Option<String> {
        crate::testing::service("EDDY_TEST_CLICKHOUSE_URL", "http://127.0.0.1:PORT")
    }

    fn ctx() -> ConnectorContext {
        ConnectorContext::for_test(TaskId { vertex: 4, subtask: 0 }, 1, schema())
    }

    async fn fresh_table(url: &str, table: &str) {
        sql(url, &format!("DROP TABLE IF EXISTS default.{table}")).await;
        sql(
            url,
            &format!(
                "CREATE TABLE default.{table} (id Int64, event_ts DateTime, duration_ms Nullable(Int64), event_type String, \
                 engagement_pct Nullable(Float64), lsn UInt64, deleted UInt8 DEFAULT 0) ENGINE = ReplacingMergeTree(lsn) ORDER BY id"
            ),
        )
        .await;
    }

    #[tokio::test]
    async fn a_password_in_a_refused_url_is_not_shown() {
        let e = ClickHouseSink::new(&options("https://user:hunter2@127.0.0.1:1", "t", 1), ctx()).err().unwrap().to_string();
        assert!(e.contains("user:***@") && !e.contains("hunter2"), "{e}");
    }

    fn options(url: &str, table: &str, batch_rows: usize) -> ClickHouseSinkOptions {
        ClickHouseSinkOptions {
            url: url.into(),
            database: "default".into(),
            table: table.into(),
            batch_rows,
            flush_interval: Duration::from_millis(200),
            version_column: Some("lsn".into()),
            deleted_column: Some("deleted".into()),
            dead_letter_path: None,
        }
    }

    #[tokio::test]
    async fn clickhouse_final_shows_latest_versions_and_flags_deletes() {
        let Some(url) = clickhouse_url() else { return };
        let _server = SERVER.lock().await;
        let table = "eddy_test_final";
        fresh_table(&url, table).await;
        let c = ctx();
        let metrics = c.metrics.clone();
        let mut sink = ClickHouseSink::new(&options(&url, table, 3), c).unwrap();
        use Op::{Insert as I, Retract as R};
        sink.write(Batch::inserts(vec![event(1, Some(1000), 10), event(2, Some(2000), 11), event(3, None, 12)])).await.unwrap();
        // Update id 1 (old image, then new), delete id 2, in one batch.
        sink.write(Batch { rows: vec![event(1, Some(1000), 10), event(1, Some(4000), 20), event(2, Some(2000), 11)], ops: vec![R, I, R] })
            .await
            .unwrap();
        // A row that waits only for the flush interval (no more input, no watermark).
        sink.write(Batch::inserts(vec![event(4, Some(500), 13)])).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while sql(&url, &format!("SELECT count() FROM default.{table} FINAL WHERE id = 4")).await != "1\n" {
            assert!(Instant::now() < deadline, "id 4 was not flushed without more input");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sink.finish().await.unwrap();
        let rows =
            sql(&url, &format!("SELECT id, duration_ms, lsn, deleted, toUnixTimestamp(event_ts) FROM default.{table} FINAL ORDER BY id"))
                .await;
        assert_eq!(rows, "1\t4000\t20\t0\t1714566896\n2\t2000\t12\t1\t1714566896\n3\t\\N\t12\t0\t1714566896\n4\t500\t13\t0\t1714566896\n");
        assert_eq!(sql(&url, &format!("SELECT count() FROM default.{table} FINAL WHERE deleted = 0")).await, "3\n");
        assert_eq!(metrics.gauges().get("rows_written"), Some(&6));
    }

    /// Rows the table cannot hold go to the dead letters with the reason; the others are stored
    /// and the job carries on.
    #[tokio::test]
    async fn clickhouse_rows_it_cannot_hold_go_to_the_dead_letters() {
        let Some(url) = clickhouse_url() else { return };
        let _server = SERVER.lock().await;
        let table = "eddy_test_bad_rows";
        sql(&url, &format!("DROP TABLE IF EXISTS default.{table}")).await;
        sql(
            &url,
            &format!(
                "CREATE TABLE default.{table} (id Int64, event_ts DateTime, duration_ms Nullable(Int32), event_type Int64, \
                 engagement_pct Nullable(Float64), lsn UInt64, deleted UInt8 DEFAULT 0) ENGINE = ReplacingMergeTree(lsn) ORDER BY id"
            ),
        )
        .await;
        let dir = crate::testing::temp_dir("ch-dead");
        let path = dir.path().join("dead.jsonl");
        let mut o = options(&url, table, 100);
        o.dead_letter_path = Some(path.to_string_lossy().into_owned());
        let c = ctx();
        let metrics = c.metrics.clone();
        let mut sink = ClickHouseSink::new(&o, c).unwrap();
        let typed = |id: i64, event_type: &str| {
            let mut row = event(id, Some(1000), 10);
            row[3] = Value::string(event_type);
            row
        };
        let mut rows: Vec<Row> = (1..=20).map(|id| typed(id, &id.to_string())).collect();
        rows[4] = typed(5, "play"); // ClickHouse cannot parse it as Int64
        rows[11] = typed(12, "pause");
        rows[6][5] = Value::Int(-5); // version -5 into UInt64
        rows[8][2] = Value::Int(99_999_999_999); // into Nullable(Int32)
        rows[9][1] = Value::Timestamp(-2_208_988_800_000); // 1900 into DateTime
        sink.write(Batch::inserts(rows)).await.unwrap();
        sink.finish().await.unwrap();

        let ids = sql(&url, &format!("SELECT groupArray(id) FROM (SELECT id FROM default.{table} FINAL ORDER BY id)")).await;
        assert_eq!(ids, "[1,2,3,4,6,8,11,13,14,15,16,17,18,19,20]\n");
        assert_eq!(metrics.dead_lettered.load(std::sync::atomic::Ordering::Relaxed), 5);
        assert_eq!(metrics.gauges().get("rows_written"), Some(&15));
        let letters: Vec<Json> = std::fs::read_to_string(&path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let mut dead: Vec<i64> = letters.iter().map(|l| l["row"]["id"].as_i64().unwrap()).collect();
        dead.sort_unstable();
        assert_eq!(dead, [5, 7, 9, 10, 12]);
        for letter in &letters {
            let error = letter["error"].as_str().unwrap();
            match letter["row"]["id"].as_i64().unwrap() {
                5 | 12 => assert!(error.contains("Code:"), "ClickHouse's own reason: {error}"),
                7 => assert!(error.contains("lsn") && error.contains("UInt64"), "{error}"),
                9 => assert!(error.contains("duration_ms") && error.contains("Int32"), "{error}"),
                _ => assert!(error.contains("event_ts") && error.contains("1900"), "{error}"),
            }
        }
    }

    #[tokio::test]
    async fn clickhouse_missing_table_is_the_users_error() {
        let Some(url) = clickhouse_url() else { return };
        let _server = SERVER.lock().await;
        let mut sink = ClickHouseSink::new(&options(&url, "eddy_test_no_such_table", 10), ctx()).unwrap();
        let e = sink.finish().await.unwrap_err();
        assert_eq!(e.blame, crate::error::Blame::User, "{}", e.message);
        assert!(e.message.contains("does not exist"), "{}", e.message);
    }

    /// Stops ClickHouse for ~5 s in the middle of a stream (with the script named by
    /// `EDDY_TEST_SERVICES_CTL`, i.e. `scripts/services.sh`) and checks that nothing is lost.
    #[tokio::test]
    async fn clickhouse_outage_loses_nothing() {
        let Some(url) = clickhouse_url() else { return };
        let Some(ctl) = crate::testing::service("EDDY_TEST_SERVICES_CTL", "scripts/services.sh") else { return };
        let _server = SERVER.lock().await;
        let table = "eddy_test_outage";
        fresh_table(&url, table).await;
        let c = ctx();
        let metrics = c.metrics.clone();
        let mut sink = ClickHouseSink::new(&options(&url, table, 50), c).unwrap();
        let run = |arg: &'static str| {
            let ctl = ctl.clone();
            async move {
                let status = tokio::process::Command::new(&ctl).args(arg.split(' ')).status().await.unwrap();
                assert!(status.success(), "{ctl} {arg} failed");
            }
        };
        let mut next_id = 0i64;
        let mut send = |n: i64| {
            let rows: Vec<Row> = (next_id..next_id + n).map(|id| event(id, Some(id), 1)).collect();
            next_id += n;
            Batch::inserts(rows)
        };
        for _ in 0..10 {
            sink.write(send(20)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        run("stop clickhouse").await;
        let start = run("start clickhouse");
        let restart = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(20)).await;
            start.await;
        });
        // Keep writing through the outage: `write` blocks once the queue is full, then resumes.
        let started = Instant::now();
        for _ in 0..20 {
            sink.write(send(20)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        restart.await.unwrap();
        sink.finish().await.unwrap();
        assert!(started.elapsed() >= Duration::from_secs(4), "the outage should have held writes back");
        assert_eq!(
            sql(&url, &format!("SELECT count(), uniqExact(id), min(id), max(id) FROM default.{table} FINAL")).await,
            format!("{next_id}\t{next_id}\t0\t{}\n", next_id - 1)
        );
        assert!(metrics.gauges().get("insert_retries").copied().unwrap_or(0) > 0);
    }
}
