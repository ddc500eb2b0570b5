//! The `postgres` lookup: a LEFT join of each row with the row of a PostgreSQL table or view whose
//! key equals the row's `on` column. A batch's missing keys are fetched in one query
//! (`WHERE key = ANY($1)`); answers — found or not — are cached up to `cache_size` keys for
//! `cache_ttl`, oldest evicted first. A row whose key is NULL or unknown gets NULL columns.
//! Values travel as text and are parsed into the declared column types.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use eddy_jobs::connectors::{redact_url, PostgresLookupOptions};
use eddy_jobs::spec::parse_duration_ms;
use eddy_jobs::{DataType, Schema, Value};
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};
use tracing::warn;

use super::{Collector, Operator};
use crate::batch::Batch;
use crate::connectors::postgres_cdc::{decode_value, quote_ident};
use crate::error::{Result, TaskError};
use crate::retry::Policy;
use crate::task::TaskMetrics;

/// LEFT join with a PostgreSQL table or view.
pub struct PostgresLookup {
    options: PostgresLookupOptions,
    on: usize,
    columns: Schema,
    query: String,
    client: Option<Client>,
    cache: HashMap<String, (Instant, Option<Vec<Value>>)>,
    order: VecDeque<String>,
    ttl: Duration,
    /// The task's metrics (where a query being retried shows).
    metrics: Arc<TaskMetrics>,
}

impl PostgresLookup {
    /// Connects (lazily retried later if the database is down now).
    pub async fn connect(o: &PostgresLookupOptions, on: usize, columns: &Schema, metrics: Arc<TaskMetrics>) -> Result<PostgresLookup> {
        let ttl = Duration::from_millis(parse_duration_ms(&o.cache_ttl).map_err(TaskError::user)?.max(0) as u64);
        let select: Vec<String> = columns.fields.iter().map(|f| format!("{}::text", quote_ident(&f.name))).collect();
        let query = format!(
            "SELECT {}::text, {} FROM {} WHERE {}::text = ANY($1)",
            quote_ident(&o.key),
            select.join(", "),
            o.table,
            quote_ident(&o.key)
        );
        let mut lookup = PostgresLookup {
            options: o.clone(),
            on,
            columns: columns.clone(),
            query,
            client: None,
            cache: HashMap::new(),
            order: VecDeque::new(),
            ttl,
            metrics,
        };
        if let Err(e) = lookup.client().await {
            warn!(error = %e, "lookup database not reachable yet; will retry");
        }
        Ok(lookup)
    }

    async fn client(&mut self) -> Result<&Client> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let (client, connection) = tokio_postgres::connect(&self.options.url, NoTls)
                .await
                .map_err(|e| TaskError::external(format!("lookup database {}: {e}", redact_url(&self.options.url))))?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    warn!(error = %e, "lookup connection ended");
                }
            });
            self.client = Some(client);
        }
        Ok(self.client.as_ref().expect("connected above"))
    }

    /// Fetches `keys`, retrying with backoff while the database is unreachable.
    async fn fetch(&mut self, keys: Vec<String>) -> Result<HashMap<String, Vec<Value>>> {
        let mut retry = Policy::DEFAULT.start_reporting(&self.metrics, "lookup");
        loop {
            let query = self.query.clone();
            let result = match self.client().await {
                Ok(client) => client.query(&query, &[&keys]).await.map_err(|e| {
                    let message = format!("lookup: {e}");
                    match e.code() {
                        Some(code) if is_user_error(code.code()) => {
                            TaskError::user(format!("{message}; check the table, key and columns of the lookup"))
                        }
                        // A restart, failover, cancelled query, serialization failure or lost
                        // connection: the same query may well succeed later.
                        _ => TaskError::external(message),
                    }
                }),
                Err(e) => Err(e),
            };
            match result {
                Ok(rows) => {
                    let mut found = HashMap::with_capacity(rows.len());
                    for r in rows {
                        let key: Option<String> = r.get(0);
                        let Some(key) = key else { continue };
                        let values = self
                            .columns
                            .fields
                            .iter()
                            .enumerate()
                            .map(|(i, f)| parse_text(r.get::<_, Option<String>>(i + 1).as_deref(), f.data_type))
                            .collect::<std::result::Result<Vec<_>, String>>()
                            .map_err(|e| TaskError::user(format!("lookup in `{}`: {e}", self.options.table)))?;
                        found.insert(key, values);
                    }
                    return Ok(found);
                }
                Err(e) if e.retryable() => {
                    let Some(delay) = retry.next_delay_after(&e) else {
                        return Err(TaskError::external(format!(
                            "{} (still failing after {} retries in {}s; check that the database is up)",
                            e.message,
                            retry.failures(),
                            retry.elapsed().as_secs()
                        )));
                    };
                    warn!(error = %e, attempt = retry.failures(), ?delay, "lookup failed; retrying");
                    self.client = None;
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn remember(&mut self, key: String, value: Option<Vec<Value>>) {
        while self.cache.len() >= self.options.cache_size.max(1) {
            match self.order.pop_front() {
                Some(old) => {
                    self.cache.remove(&old);
                }
                None => break,
            }
        }
        if self.cache.insert(key.clone(), (Instant::now(), value)).is_none() {
            self.order.push_back(key);
        }
    }
}

#[async_trait::async_trait]
impl Operator for PostgresLookup {
    async fn process_batch(&mut self, mut batch: Batch, out: &mut Collector) -> Result<()> {
        let now = Instant::now();
        let keys: Vec<Option<String>> = batch.rows.iter().map(|r| key_text(&r[self.on])).collect();
        let mut missing: Vec<String> = keys
            .iter()
            .flatten()
            .filter(|k| self.cache.get(*k).is_none_or(|(at, _)| now.duration_since(*at) > self.ttl))
            .cloned()
            .collect();
        missing.sort_unstable();
        missing.dedup();
        // What this batch's rows get, taken before the cache makes room for the new keys: with
        // more distinct keys in a batch than `cache_size`, the cache cannot hold them all at once.
        let mut batch_values: HashMap<String, Option<Vec<Value>>> = HashMap::new();
        for k in keys.iter().flatten() {
            if let Some((_, v)) = self.cache.get(k) {
                batch_values.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        if !missing.is_empty() {
            let mut found = self.fetch(missing.clone()).await?;
            for k in missing {
                let v = found.remove(&k);
                batch_values.insert(k.clone(), v.clone());
                self.remember(k, v);
            }
        }
        let width = self.columns.fields.len();
        for (row, key) in batch.rows.iter_mut().zip(keys) {
            match key.and_then(|k| batch_values.get(&k)).and_then(|v| v.as_ref()) {
                Some(values) => row.extend(values.iter().cloned()),
                None => row.extend(std::iter::repeat_n(Value::Null, width)),
            }
        }
        out.main.push(batch);
        Ok(())
    }
}

/// A key as the text PostgreSQL compares it with.
fn key_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.to_string()),
        Value::Int(i) => Some(i.to_string()),
        Value::Float(f) => Some(f.to_string()),
        Value::Bool(b) => Some(if *b { "true" } else { "false" }.to_string()),
        Value::Timestamp(t) => Some(eddy_jobs::time::format_timestamp(*t)),
    }
}

/// Parses PostgreSQL's text output of a value into `ty` (the same decoding as the CDC source's).
pub fn parse_text(text: Option<&str>, ty: DataType) -> std::result::Result<Value, String> {
    text.map_or(Ok(Value::Null), |t| decode_value(t, ty))
}

/// Whether a SQLSTATE means the lookup itself is wrong (retrying the same query cannot help):
/// syntax or access rule violations (class 42: an unknown table or column), data exceptions (22),
/// a refused login (28), an unknown database (3D), an unsupported feature (0A). Every other
/// class — connection exceptions (08), operator intervention such as a server restart (57),
/// transaction rollbacks (40), insufficient resources (53), system errors (58) — passes with time.
fn is_user_error(sqlstate: &str) -> bool {
    matches!(sqlstate.get(..2), Some("42" | "22" | "28" | "3D" | "0A"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_postgres_text() {
        assert_eq!(parse_text(Some("42"), DataType::Int), Ok(Value::Int(42)));
        assert_eq!(parse_text(None, DataType::Int), Ok(Value::Null));
        assert_eq!(parse_text(Some("t"), DataType::Bool), Ok(Value::Bool(true)));
        assert_eq!(parse_text(Some("2024-05-01 12:34:56.5+00"), DataType::Timestamp), Ok(Value::Timestamp(1_714_566_896_500)));
        assert!(parse_text(Some("x"), DataType::Float).is_err());
        assert_eq!(redact_url("postgres://eddy:secret@h:5432/db"), "postgres://eddy:***@h:5432/db");
    }

    #[test]
    fn only_mistakes_in_the_lookup_are_the_users() {
        for user in ["42P01", "42703", "22P02", "28P01", "3D000"] {
            assert!(is_user_error(user), "{user}");
        }
        for passing in ["57P01", "57014", "40001", "08006", "53300", "XX000"] {
            assert!(!is_user_error(passing), "{passing}");
        }
    }

    /// Against a real server (`EDDY_TEST_PG_URL`): a batch with more distinct keys than the cache
    /// holds is enriched whole (the cache used to evict keys the batch still needed: NULLs).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_wider_than_the_cache_is_enriched_whole() {
        let Ok(url) = std::env::var("EDDY_TEST_PG_URL") else {
            eprintln!("skipped: set EDDY_TEST_PG_URL=postgres://user@host:port/db to run against a real PostgreSQL");
            return;
        };
        let (admin, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(connection);
        let table = format!("wide_dim_{}", std::process::id());
        admin
            .batch_execute(&format!(
                "CREATE TABLE {table} (id text PRIMARY KEY, slug text);
                 INSERT INTO {table} SELECT g::text, 'slug-' || g FROM generate_series(1, 6) g;"
            ))
            .await
            .unwrap();
        let options = PostgresLookupOptions {
            url: url.clone(),
            table: table.clone(),
            key: "id".into(),
            columns: "slug VARCHAR".into(),
            cache_size: 2,
            cache_ttl: "60s".into(),
        };
        let columns = eddy_jobs::connectors::parse_columns(&options.columns).unwrap();
        let mut lookup = PostgresLookup::connect(&options, 0, &columns, Arc::default()).await.unwrap();
        let mut out = Collector::default();
        for keys in [vec![1, 2], vec![1, 2, 3, 4, 5, 6, 1]] {
            let rows = keys.iter().map(|k: &i64| vec![Value::String(k.to_string().into())]).collect();
            lookup.process_batch(Batch::inserts(rows), &mut out).await.unwrap();
        }
        admin.batch_execute(&format!("DROP TABLE {table}")).await.unwrap();
        let enriched: Vec<Value> = out.main[1].rows.iter().map(|r| r[1].clone()).collect();
        let want: Vec<Value> = [1, 2, 3, 4, 5, 6, 1].iter().map(|k| Value::String(format!("slug-{k}").into())).collect();
        assert_eq!(enriched, want);
    }

    /// Against a real server (`EDDY_TEST_PG_URL`): the server ends the lookup's query in flight
    /// (as a restart or failover does, SQLSTATE 57P01); the lookup retries and answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_query_ended_by_the_server_is_retried() {
        let Ok(url) = std::env::var("EDDY_TEST_PG_URL") else {
            eprintln!("skipped: set EDDY_TEST_PG_URL=postgres://user@host:port/db to run against a real PostgreSQL");
            return;
        };
        let (admin, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(connection);
        let view = format!("slow_dim_{}", std::process::id());
        // Slow on the first query only, so that the retry answers at once.
        admin
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {view}_seen (n int);
                 CREATE OR REPLACE VIEW {view} AS
                   SELECT '1'::text AS id, 'one'::text AS slug
                   FROM (SELECT pg_sleep(CASE WHEN EXISTS (SELECT 1 FROM {view}_seen) THEN 0 ELSE 30 END)) s;"
            ))
            .await
            .unwrap();
        let options = PostgresLookupOptions {
            url: url.clone(),
            table: view.clone(),
            key: "id".into(),
            columns: "slug VARCHAR".into(),
            cache_size: 10,
            cache_ttl: "60s".into(),
        };
        let columns = eddy_jobs::connectors::parse_columns(&options.columns).unwrap();
        let mut lookup = PostgresLookup::connect(&options, 0, &columns, Arc::default()).await.unwrap();
        let fetch = tokio::spawn(async move { lookup.fetch(vec!["1".into()]).await });
        // Wait for the query to be running, then end it from the server side.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let ended = admin
                .query_one(
                    &format!("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query LIKE '%FROM {view} WHERE%' AND pid <> pg_backend_pid()"),
                    &[],
                )
                .await
                .unwrap();
            if ended.get::<_, i64>(0) > 0 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the lookup query never showed up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        admin.batch_execute(&format!("INSERT INTO {view}_seen VALUES (1)")).await.unwrap();
        let found = fetch.await.unwrap();
        admin.batch_execute(&format!("DROP VIEW {view}; DROP TABLE {view}_seen")).await.unwrap();
        let found = found.expect("the lookup should retry after the server ended its query");
        assert_eq!(found.get("1"), Some(&vec![Value::String("one".into())]));
    }
}
