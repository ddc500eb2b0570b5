//! The `http` sink: one JSON `POST` per inserted row to an external endpoint.
//!
//! Each `Op::Insert` row becomes a JSON object of the chosen `columns` (all by default; timestamps as
//! ISO-8601 UTC strings such as `2024-05-01T12:34:56.789Z`) sent with an `Idempotency-Key` header:
//! the values of the `idempotency_key` columns joined with `:`. The external system receives event
//! versions, and the key (event id and version) makes a replay after a crash harmless for a
//! receiver that deduplicates by it. An update's old row (a retraction followed by an insert of the
//! same `key`) is never sent. A delete (any other retraction) is sent with `deleted_field`, as the
//! deleted row with that field `true` (`false` in every other body), under the delete's own
//! version, which upstream sources give it, and with `:deleted` after its key: a delete that came
//! without a version of its own (a tombstone from another producer) never shares its insert's key,
//! which a receiver would take for a replay of the insert. Without `deleted_field` deletes are not
//! sent.
//!
//! At most `concurrency` requests are in flight: each row is delivered by its own tokio task held in
//! a `JoinSet`, and `write` waits for one to finish when the set is full (backpressure). Timeouts,
//! connection errors, `408`, `429` and `5xx` answers are retried under the connectors' shared
//! policy ([`crate::retry`]: backoff with jitter) for `retry_for` (default 5 minutes, so an outage of
//! the endpoint is ridden out) and at most `max_retries` times if that is set; any other answer
//! outside `2xx`, or running out of retries, sends the row to
//! the dead-letter file (`{"row": …, "idempotency_key": …, "error": …}` per line, when
//! `dead_letter_path` is set), counts it in `dead_lettered` and logs it. The job carries on.
//! `finish` waits for every request. Gauges: `http_sent` (rows accepted by the endpoint) and
//! `http_retries` (retried attempts).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use eddy_jobs::connectors::{redact_url, HttpSinkOptions};
use eddy_jobs::{Row, Value};
use tokio::task::{JoinError, JoinSet};

use crate::batch::{Batch, Op};
use crate::error::{Result, TaskError};
use crate::json::{json_string, object_text, Timestamps};
use crate::operator::{ConnectorContext, DeadLetters, OperatorSnapshot, Sink, Stage};
use crate::retry::Policy;

/// The HTTP sink.
pub struct HttpSink {
    endpoint: Arc<Endpoint>,
    /// Body columns: JSON-quoted name and row position.
    body_columns: Vec<(String, usize)>,
    key_columns: Vec<usize>,
    /// With deletes sent: the JSON-quoted field name, and the columns identifying a row.
    deleted: Option<(String, Vec<usize>)>,
    concurrency: usize,
    in_flight: JoinSet<Delivery>,
    dead_letters: DeadLetters,
}

/// What every request task shares: where and how to send, when to give up, and live figures.
struct Endpoint {
    client: reqwest::Client,
    url: reqwest::Url,
    policy: Policy,
    max_retries: Option<u32>,
    sent: AtomicU64,
    retries: AtomicU64,
    ctx: ConnectorContext,
}

/// How one row's delivery ended.
#[derive(Debug)]
enum Delivery {
    Sent,
    Failed { body: String, key: String, error: String },
}

/// What to do after one attempt.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Done,
    Retry(String),
    Refused(String),
}

impl HttpSink {
    /// Checks the options and builds the client; nothing is sent until rows arrive.
    pub fn new(o: &HttpSinkOptions, ctx: ConnectorContext) -> Result<HttpSink> {
        let shown = redact_url(&o.url);
        let url = reqwest::Url::parse(&o.url).map_err(|e| TaskError::user(format!("http sink: options.url `{shown}`: {e}")))?;
        if url.scheme() != "http" {
            return Err(TaskError::user(format!("http sink: options.url `{shown}`: only http:// is supported (this build has no TLS)")));
        }
        let timeout = o.timeout.max(Duration::from_millis(1));
        let column = |name: &str, what: &str| {
            ctx.schema
                .index_of(name)
                .ok_or_else(|| TaskError::user(format!("http sink: {what}: no input column `{name}`; columns are {}", ctx.schema.names())))
        };
        let columns = |names: &[String], what: &str| names.iter().map(|n| column(n, what)).collect::<Result<Vec<_>>>();
        let body_columns = match &o.columns {
            Some(names) => names.iter().map(|n| Ok((json_string(n), column(n, "options.columns")?))).collect::<Result<Vec<_>>>()?,
            None => ctx.schema.fields.iter().enumerate().map(|(i, f)| (json_string(&f.name), i)).collect(),
        };
        let key_columns = columns(&o.idempotency_key, "options.idempotency_key")?;
        let deleted = o.deleted_field.as_ref().map(|f| columns(&o.key, "options.key").map(|key| (json_string(f), key))).transpose()?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(o.concurrency.max(1))
            // A redirect is an answer like any other (refused, see `classify_status`): following
            // it would reach a host the worker's --allow-hosts never checked.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| TaskError::internal(format!("http sink: building the HTTP client: {e}")))?;
        Ok(HttpSink {
            body_columns,
            key_columns,
            deleted,
            concurrency: o.concurrency.max(1),
            in_flight: JoinSet::new(),
            dead_letters: DeadLetters::open("http sink", o.dead_letter_path.as_deref(), ctx.metrics.clone())?,
            endpoint: Arc::new(Endpoint {
                client,
                url,
                policy: Policy { first: Duration::from_millis(100), max: Duration::from_secs(10), budget: o.retry_for },
                max_retries: o.max_retries,
                sent: AtomicU64::new(0),
                retries: AtomicU64::new(0),
                ctx,
            }),
        })
    }

    /// Records how one delivery ended: a failure goes to the dead-letter file and the counter.
    fn settle(&mut self, joined: std::result::Result<Delivery, JoinError>) -> Result<()> {
        let delivery = joined.map_err(|e| TaskError::internal(format!("http sink: a request task failed: {e}")))?;
        let Delivery::Failed { body, key, error } = delivery else {
            return Ok(());
        };
        tracing::warn!(job_id = %self.endpoint.ctx.job_id, task = %self.endpoint.ctx.task, idempotency_key = %key, %error, "http sink: row dead-lettered");
        self.dead_letters.record(&format!("{{\"row\":{body},\"idempotency_key\":{},\"error\":{}}}", json_string(&key), json_string(&error)))
    }

    /// Settles the deliveries that have already ended, without waiting.
    fn settle_ready(&mut self) -> Result<()> {
        while let Some(joined) = self.in_flight.try_join_next() {
            self.settle(joined)?;
        }
        Ok(())
    }
}

#[async_trait]
impl Stage for HttpSink {
    async fn snapshot(&mut self, _id: u64, _scratch: &Path) -> Result<OperatorSnapshot> {
        // Rows before the barrier are not read again after a restore: deliver them first (all
        // that `finish` does).
        self.finish().await?;
        Ok(OperatorSnapshot::default())
    }
}

#[async_trait]
impl Sink for HttpSink {
    async fn write(&mut self, batch: Batch) -> Result<()> {
        for (i, (row, op)) in batch.rows.iter().zip(&batch.ops).enumerate() {
            match (op, &self.deleted) {
                (Op::Retract, None) => continue,
                // An update's old row: the insert that follows replaces it.
                (Op::Retract, Some((_, key))) if crate::batch::is_update_old_row(&batch.rows, &batch.ops, i, key) => continue,
                _ => {}
            }
            let mut body = object_text(&self.body_columns, row, Timestamps::Iso8601);
            if let Some((field, _)) = &self.deleted {
                body.pop();
                let _ = write!(body, "{}{field}:{}}}", if body.len() > 1 { "," } else { "" }, *op == Op::Retract);
            }
            let mut key = render_key(&self.key_columns, row);
            if *op == Op::Retract {
                key.push_str(":deleted");
            }
            while self.in_flight.len() >= self.concurrency {
                if let Some(joined) = self.in_flight.join_next().await {
                    self.settle(joined)?;
                }
            }
            self.in_flight.spawn(self.endpoint.clone().deliver(body, key));
        }
        self.settle_ready()
    }

    async fn on_watermark(&mut self, _watermark: i64) -> Result<()> {
        self.settle_ready()
    }

    async fn finish(&mut self) -> Result<()> {
        while let Some(joined) = self.in_flight.join_next().await {
            self.settle(joined)?;
        }
        Ok(())
    }
}

impl Endpoint {
    /// Delivers one row, in its own task.
    async fn deliver(self: Arc<Self>, body: String, key: String) -> Delivery {
        let mut retry = self.policy.start_reporting(&self.ctx.metrics, "http sink");
        loop {
            let sent = self
                .client
                .post(self.url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("Idempotency-Key", header_safe(&key))
                .body(body.clone())
                .send()
                .await;
            let verdict = match sent {
                Ok(response) => {
                    let status = response.status().as_u16();
                    // Read the answer: it frees the connection for reuse and explains a refusal.
                    let text = response.text().await.unwrap_or_default();
                    classify_status(status, &text)
                }
                Err(e) => classify_error(&e),
            };
            match verdict {
                Verdict::Done => {
                    let sent = self.sent.fetch_add(1, Ordering::Relaxed) + 1;
                    self.ctx.metrics.set_gauge("http_sent", sent as i64);
                    return Delivery::Sent;
                }
                Verdict::Refused(error) => return Delivery::Failed { body, key, error },
                Verdict::Retry(error) => {
                    let capped = self.max_retries.is_some_and(|m| retry.failures() >= m);
                    let Some(delay) = (!capped).then(|| retry.next_delay_after(&error)).flatten() else {
                        let error = format!("{error} (gave up after {} retries in {}s)", retry.failures(), retry.elapsed().as_secs());
                        return Delivery::Failed { body, key, error };
                    };
                    let retries = self.retries.fetch_add(1, Ordering::Relaxed) + 1;
                    self.ctx.metrics.set_gauge("http_retries", retries as i64);
                    tracing::debug!(job_id = %self.ctx.job_id, task = %self.ctx.task, idempotency_key = %key, attempt = retry.failures(), %error, ?delay, "http sink: retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// `2xx` is done; `408`, `429` and `5xx` may pass later; any other answer will not.
fn classify_status(status: u16, text: &str) -> Verdict {
    let detail = || {
        let text = text.trim();
        let cut = text.char_indices().nth(200).map_or(text.len(), |(i, _)| i);
        if text.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status}: {}", &text[..cut])
        }
    };
    match status {
        200..=299 => Verdict::Done,
        408 | 429 | 500..=599 => Verdict::Retry(detail()),
        _ => Verdict::Refused(detail()),
    }
}

/// Timeouts and connection or transfer failures may pass later; a request that cannot be built
/// will not.
fn classify_error(e: &reqwest::Error) -> Verdict {
    if e.is_builder() {
        Verdict::Refused(format!("bad request: {e}"))
    } else if e.is_timeout() {
        Verdict::Retry(format!("timed out: {e}"))
    } else {
        Verdict::Retry(format!("request failed: {e}"))
    }
}

/// The `Idempotency-Key`: key column values joined with `:` (timestamps as epoch milliseconds,
/// NULL as nothing).
fn render_key(columns: &[usize], row: &Row) -> String {
    let value = |idx: &usize| match row.get(*idx).unwrap_or(&Value::Null) {
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Int(v) | Value::Timestamp(v) => v.to_string(),
        Value::Float(f) => f.to_string(),
        Value::String(s) => s.to_string(),
    };
    columns.iter().map(value).collect::<Vec<_>>().join(":")
}

/// A header value holds visible ASCII only: other bytes (and `%`) are percent-encoded.
fn header_safe(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> Row {
        vec![Value::Int(42), Value::string("c-1"), Value::Timestamp(1_714_566_896_789), Value::Float(0.25), Value::Null, Value::Int(7)]
    }

    #[test]
    fn key_joins_values_with_colons() {
        assert_eq!(render_key(&[0, 5], &row()), "42:7");
        assert_eq!(render_key(&[1, 4, 2], &row()), "c-1::1714566896789");
        assert_eq!(header_safe("42:7"), "42:7");
        assert_eq!(header_safe("é:%"), "%C3%A9:%25");
    }

    #[test]
    fn retry_classification() {
        assert_eq!(classify_status(200, ""), Verdict::Done);
        assert_eq!(classify_status(204, ""), Verdict::Done);
        assert_eq!(classify_status(503, "busy"), Verdict::Retry("HTTP 503: busy".into()));
        assert_eq!(classify_status(500, ""), Verdict::Retry("HTTP 500".into()));
        assert!(matches!(classify_status(429, ""), Verdict::Retry(_)));
        assert!(matches!(classify_status(408, ""), Verdict::Retry(_)));
        assert_eq!(classify_status(400, "bad field"), Verdict::Refused("HTTP 400: bad field".into()));
        assert!(matches!(classify_status(404, ""), Verdict::Refused(_)));
        assert!(matches!(classify_status(302, ""), Verdict::Refused(_)));
    }

    // ---- Integration tests against the mock external system (`eddy-mock-api`). ----

    use eddy_jobs::{DataType, Field, Schema, TaskId};

    use crate::operator::TaskMetrics;
    use crate::testing::{mock_api_bin, MockApi};

    fn schema() -> Schema {
        Schema::new(vec![
            Field::new("id", DataType::Int),
            Field::new("version", DataType::Int),
            Field::new("content_id", DataType::String),
            Field::new("event_ts", DataType::Timestamp),
            Field::new("engagement_pct", DataType::Float),
        ])
    }

    fn ctx() -> ConnectorContext {
        ConnectorContext::for_test(TaskId { vertex: 5, subtask: 0 }, 1, schema())
    }

    fn options(url: &str) -> HttpSinkOptions {
        HttpSinkOptions {
            url: format!("{url}/events"),
            columns: Some(vec!["id".into(), "content_id".into(), "event_ts".into(), "engagement_pct".into()]),
            idempotency_key: vec!["id".into(), "version".into()],
            concurrency: 4,
            timeout: Duration::from_secs(2),
            retry_for: Duration::from_secs(30),
            max_retries: Some(5),
            dead_letter_path: None,
            deleted_field: None,
            key: Vec::new(),
        }
    }

    fn event(id: i64, version: i64) -> Row {
        vec![Value::Int(id), Value::Int(version), Value::string("c-1"), Value::Timestamp(1_714_566_896_789 + id), Value::Float(0.5)]
    }

    /// Inserts of ids `0..n` (version 1), each preceded by a retraction the sink must skip.
    fn stream(n: i64) -> Vec<Batch> {
        (0..n)
            .collect::<Vec<_>>()
            .chunks(7)
            .map(|ids| {
                let mut b = Batch::default();
                for &id in ids {
                    b.push(event(id, 0), Op::Retract);
                    b.push(event(id, 1), Op::Insert);
                }
                b
            })
            .collect()
    }

    fn gauge(m: &TaskMetrics, name: &str) -> i64 {
        m.gauges().get(name).copied().unwrap_or(0)
    }

    /// A password in the URL shows in no error: not when the URL is refused at start, nor when a
    /// request fails (reqwest names the URL, without its credentials), which is what
    /// `eddy status` and the logs show.
    #[tokio::test]
    async fn a_password_in_the_url_shows_in_no_error() {
        let refused = HttpSink::new(&options("ftp://user:hunter2@127.0.0.1:1"), ctx()).err().unwrap().to_string();
        assert!(refused.contains("user:***@") && !refused.contains("hunter2"), "{refused}");
        let failed = reqwest::Client::new().post("http://user:hunter2@127.0.0.1:1/events").send().await.unwrap_err();
        let (Verdict::Retry(text) | Verdict::Refused(text)) = classify_error(&failed) else { panic!("a failed request is a verdict") };
        assert!(text.contains("127.0.0.1:1") && !text.contains("hunter2"), "{text}");
    }

    #[tokio::test]
    async fn http_delivers_every_row_once_through_failures() {
        let Some(bin) = mock_api_bin() else { return };
        let mock = MockApi::start(&bin, &["--fail-every", "3"]).await;
        let c = ctx();
        let metrics = c.metrics.clone();
        let mut sink = HttpSink::new(&options(&mock.base), c).unwrap();
        for batch in stream(60) {
            sink.write(batch).await.unwrap();
        }
        sink.finish().await.unwrap();

        let stats = mock.get("/stats").await;
        let failed = stats["failed"].as_i64().unwrap();
        assert_eq!(stats["unique"], 60, "{stats}");
        assert_eq!(stats["duplicates"], 0, "{stats}");
        assert_eq!(stats["received"].as_i64().unwrap(), 60 + failed, "{stats}");
        assert_eq!(failed, stats["received"].as_i64().unwrap() / 3, "{stats}");
        assert_eq!(gauge(&metrics, "http_sent"), 60);
        assert_eq!(gauge(&metrics, "http_retries"), failed);
        assert_eq!(metrics.dead_lettered.load(Ordering::Relaxed), 0);
        let events = mock.get("/events").await;
        let mut keys: Vec<String> = events.as_array().unwrap().iter().map(|e| e["key"].as_str().unwrap().to_string()).collect();
        keys.sort();
        let mut expected: Vec<String> = (0..60).map(|id| format!("{id}:1")).collect();
        expected.sort();
        assert_eq!(keys, expected);
        let first = events.as_array().unwrap().iter().find(|e| e["key"] == "0:1").unwrap();
        assert_eq!(
            first["body"],
            serde_json::json!({"id": 0, "content_id": "c-1", "event_ts": "2024-05-01T12:34:56.789Z", "engagement_pct": 0.5})
        );

        // A replay after a crash: the receiver sees only duplicates.
        let mut replay = HttpSink::new(&options(&mock.base), ctx()).unwrap();
        for batch in stream(60) {
            replay.write(batch).await.unwrap();
        }
        replay.finish().await.unwrap();
        let stats = mock.get("/stats").await;
        assert_eq!((stats["unique"].as_i64(), stats["duplicates"].as_i64()), (Some(60), Some(60)), "{stats}");
    }

    /// With `deleted_field`, a delete reaches the receiver under its own version and a key of
    /// its own (even when it has no version of its own); an update's old row does not.
    #[tokio::test]
    async fn http_sends_deletes_under_their_version_and_never_an_updates_old_row() {
        let Some(bin) = mock_api_bin() else { return };
        let mock = MockApi::start(&bin, &[]).await;
        let o = HttpSinkOptions { deleted_field: Some("deleted".into()), key: vec!["id".into()], ..options(&mock.base) };
        let mut sink = HttpSink::new(&o, ctx()).unwrap();
        let mut b = Batch::default();
        b.push(event(1, 1), Op::Insert);
        b.push(event(1, 1), Op::Retract); // an update: old row, then new
        b.push(event(1, 2), Op::Insert);
        b.push(event(1, 3), Op::Retract); // a delete
        b.push(event(2, 1), Op::Insert);
        b.push(event(2, 5), Op::Retract); // a delete, though an insert of another id follows
        b.push(event(3, 1), Op::Insert);
        b.push(event(3, 1), Op::Retract); // a delete without a version of its own
        sink.write(b).await.unwrap();
        sink.finish().await.unwrap();
        let events = mock.get("/events").await;
        let mut got: Vec<(String, bool)> = events
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["key"].as_str().unwrap().to_string(), e["body"]["deleted"].as_bool().unwrap()))
            .collect();
        got.sort();
        let want = [
            ("1:1", false),
            ("1:2", false),
            ("1:3:deleted", true),
            ("2:1", false),
            ("2:5:deleted", true),
            ("3:1", false),
            ("3:1:deleted", true),
        ];
        assert_eq!(got, want.map(|(k, d)| (k.to_string(), d)));
    }

    #[tokio::test]
    async fn http_dead_letters_refusals_and_exhausted_retries() {
        let Some(bin) = mock_api_bin() else { return };
        let mock = MockApi::start(&bin, &["--fail-every", "2"]).await;
        let dir = crate::testing::temp_dir("http-dead-letters");
        let path = dir.path().join("dead.jsonl");
        let c = ctx();
        let metrics = c.metrics.clone();
        let mut o = options(&mock.base);
        o.max_retries = Some(0);
        o.concurrency = 1;
        o.idempotency_key = vec!["id".into()];
        o.dead_letter_path = Some(path.to_string_lossy().into_owned());
        let mut sink = HttpSink::new(&o, c).unwrap();
        // Ten good rows, then two whose key is empty (refused with 400 by the mock).
        let mut rows: Vec<Row> = (0..10).map(|id| event(id, 1)).collect();
        rows.push(vec![Value::Null, Value::Null, Value::string("c-2"), Value::Timestamp(0), Value::Null]);
        rows.push(vec![Value::Null, Value::Null, Value::string("c-3"), Value::Timestamp(0), Value::Null]);
        sink.write(Batch::inserts(rows)).await.unwrap();
        sink.finish().await.unwrap();

        let stats = mock.get("/stats").await;
        let lines: Vec<serde_json::Value> =
            std::fs::read_to_string(&path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        // One request at a time: rows 1, 3, …, 11 hit the mock's every-other 503 and have no retry
        // left; row 10 has an empty key and is refused with 400; rows 0, 2, 4, 6, 8 arrive.
        for (field, want) in [("received", 12), ("unique", 5), ("duplicates", 0), ("failed", 6), ("refused", 1)] {
            assert_eq!(stats[field], want, "{field} in {stats}");
        }
        assert_eq!(lines.len(), 7);
        assert_eq!(metrics.dead_lettered.load(Ordering::Relaxed), 7);
        let errors = |prefix: &str| lines.iter().filter(|l| l["error"].as_str().unwrap().starts_with(prefix)).count();
        assert_eq!(errors("HTTP 503"), 6, "{lines:?}");
        assert!(lines
            .iter()
            .all(|l| !l["error"].as_str().unwrap().starts_with("HTTP 503")
                || l["error"].as_str().unwrap().contains("(gave up after 0 retries")));
        let refusal = lines.iter().find(|l| l["error"].as_str().unwrap().starts_with("HTTP 400")).unwrap();
        assert_eq!(refusal["idempotency_key"], "");
        assert_eq!(
            refusal["row"],
            serde_json::json!({"id": null, "content_id": "c-2", "event_ts": "1970-01-01T00:00:00.000Z", "engagement_pct": null})
        );
        let row_3 = lines.iter().find(|l| l["idempotency_key"] == "3").unwrap();
        assert_eq!(row_3["row"]["id"], 3);
    }

    #[tokio::test]
    async fn http_timeouts_are_retried_then_dead_lettered() {
        let Some(bin) = mock_api_bin() else { return };
        let mock = MockApi::start(&bin, &["--latency-ms", "500"]).await;
        let c = ctx();
        let metrics = c.metrics.clone();
        let mut o = options(&mock.base);
        o.timeout = Duration::from_millis(100);
        o.max_retries = Some(2);
        let mut sink = HttpSink::new(&o, c).unwrap();
        sink.write(Batch::inserts(vec![event(1, 1)])).await.unwrap();
        sink.finish().await.unwrap();
        assert_eq!(gauge(&metrics, "http_retries"), 2);
        assert_eq!(gauge(&metrics, "http_sent"), 0);
        assert_eq!(metrics.dead_lettered.load(Ordering::Relaxed), 1);
    }
}
