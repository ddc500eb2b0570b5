//! The `postgres` lookup: a LEFT join of each row with the row of a PostgreSQL table or view whose
//! key equals the row's `on` column. A batch's missing keys are fetched in one query
//! (`WHERE key = ANY($1)`); answers — found or not — are cached up to `cache_size` keys for
//! `cache_ttl`, oldest evicted first. A row whose key is NULL or unknown gets NULL columns.
//! Values travel as text and are parsed into the declared column types.
//!
//! Over a changelog (an upsert or CDC source upstream, [`LookupMemory`]) the lookup remembers, per
//! row key, the values it joined to the key's current row, in a [`LastValueState`] on the job's
//! state backend, checkpointed with the job. A retraction then carries the values its insert got:
//! were it joined again, a dimension row changed in between would make a SUM over its columns
//! drift, and a replay would send the external system another payload.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use eddy_jobs::connectors::{redact_url, PostgresLookupOptions};
use eddy_jobs::plan::{LookupMemory, StateBackend};
use eddy_jobs::{DataType, Schema, Value};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};
use tracing::warn;

use super::quote_ident;
use super::text::decode_value;
use crate::batch::{Batch, Op};
use crate::error::{Result, TaskError};
use crate::keys::groups_overlap;
use crate::operator::{Collector, InlineState, Operator, OperatorContext, OperatorSnapshot, Stage, TaskMetrics};
use crate::retry::Policy;
use crate::state::last_value::{self, LastValueState};

/// LEFT join with a PostgreSQL table or view.
pub struct PostgresLookup {
    options: PostgresLookupOptions,
    on: usize,
    columns: Schema,
    query: String,
    client: Option<Client>,
    cache: HashMap<String, (Instant, Option<Vec<Value>>)>,
    order: VecDeque<String>,
    /// The task's metrics (where a query being retried shows).
    metrics: Arc<TaskMetrics>,
    /// Over a changelog: what each row key's current row was joined with.
    memory: Option<Memory>,
}

impl PostgresLookup {
    /// Connects (lazily retried later if the database is down now).
    pub async fn connect(o: &PostgresLookupOptions, on: usize, columns: &Schema, metrics: Arc<TaskMetrics>) -> Result<PostgresLookup> {
        let select: Vec<String> = columns.fields.iter().map(|f| format!("{}::text", quote_ident(&f.name))).collect();
        // Checked at submit (`table_name`); quoted here as well, part by part.
        let table: Vec<String> =
            eddy_jobs::connectors::table_name("options.table", &o.table).map_err(TaskError::user)?.iter().map(|p| quote_ident(p)).collect();
        let (key, select, table) = (quote_ident(&o.key), select.join(", "), table.join("."));
        let query = format!("SELECT {key}::text, {select} FROM {table} WHERE {key}::text = ANY($1)");
        let mut lookup = PostgresLookup {
            options: o.clone(),
            on,
            columns: columns.clone(),
            query,
            client: None,
            cache: HashMap::new(),
            order: VecDeque::new(),
            metrics,
            memory: None,
        };
        if let Err(e) = lookup.client().await {
            warn!(error = %e, "lookup database not reachable yet; will retry");
        }
        Ok(lookup)
    }

    /// Over a changelog (`memory` set), remembers what each row key's row was joined with, as
    /// restored from `ctx`.
    pub fn remembering(
        mut self,
        memory: Option<&LookupMemory>,
        backend: StateBackend,
        max_parallelism: u32,
        ctx: &OperatorContext,
    ) -> Result<Self> {
        if let Some(plan) = memory {
            self.memory = Some(Memory::open(plan, self.columns.fields.len(), backend, max_parallelism, ctx)?);
        }
        Ok(self)
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
                        let Some(key) = r.get::<_, Option<String>>(0) else { continue };
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
            let Some(old) = self.order.pop_front() else { break };
            self.cache.remove(&old);
        }
        if self.cache.insert(key.clone(), (Instant::now(), value)).is_none() {
            self.order.push_back(key);
        }
    }
}

#[async_trait::async_trait]
impl Stage for PostgresLookup {
    async fn snapshot(&mut self, _id: u64, scratch: &Path) -> Result<OperatorSnapshot> {
        match &mut self.memory {
            Some(memory) => memory.snapshot(scratch),
            None => Ok(OperatorSnapshot::default()),
        }
    }
}

#[async_trait::async_trait]
impl Operator for PostgresLookup {
    async fn process_batch(&mut self, mut batch: Batch, out: &mut Collector) -> Result<()> {
        let now = Instant::now();
        // A retraction whose insert this lookup joined takes that insert's values.
        let memory_keys = self.memory.as_ref().map(|m| m.keys(&batch));
        let remembered = match (&mut self.memory, &memory_keys) {
            (Some(memory), Some(keys)) => memory.recall(&batch, keys)?,
            _ => vec![None; batch.len()],
        };
        let keys: Vec<Option<String>> =
            batch.rows.iter().zip(&remembered).map(|(r, known)| if known.is_some() { None } else { key_text(&r[self.on]) }).collect();
        let mut missing: Vec<String> = keys
            .iter()
            .flatten()
            .filter(|k| self.cache.get(*k).is_none_or(|(at, _)| now.duration_since(*at) > self.options.cache_ttl))
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
        let joined: Vec<Vec<Value>> = keys
            .into_iter()
            .zip(remembered)
            .map(|(key, known)| {
                known.unwrap_or_else(|| key.and_then(|k| batch_values.get(&k)?.clone()).unwrap_or_else(|| vec![Value::Null; width]))
            })
            .collect();
        if let (Some(memory), Some(keys)) = (&mut self.memory, &memory_keys) {
            memory.note(&batch, keys, &joined)?;
        }
        for (row, values) in batch.rows.iter_mut().zip(joined) {
            row.extend(values);
        }
        out.main.push(batch);
        Ok(())
    }

    async fn on_watermark(&mut self, watermark: i64, _out: &mut Collector) -> Result<()> {
        if let Some(memory) = &mut self.memory {
            memory.advance(watermark)?;
        }
        Ok(())
    }
}

/// How often expired keys are swept out of the memory (they are never read once expired).
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// What a lookup over a changelog joined to each row key's current row ([`LookupMemory`]).
struct Memory {
    plan: LookupMemory,
    /// The number of looked-up columns.
    width: usize,
    state: Box<dyn LastValueState>,
    max_parallelism: u32,
    /// The key groups this subtask owns; a snapshot records them to tell, on restore, its own
    /// subtask's from another's.
    key_groups: Range<u32>,
    /// The input watermark: the clock the time to live counts on.
    watermark: i64,
    next_sweep: Instant,
}

impl Memory {
    fn open(plan: &LookupMemory, width: usize, backend: StateBackend, max_parallelism: u32, ctx: &OperatorContext) -> Result<Memory> {
        let mut state = last_value::open(backend, &ctx.state_dir.join("joined"), plan.ttl_ms)?;
        for restored in &ctx.restore {
            let (Some(files), Some(taken)) = (&restored.files, restored.read(|old| Ok(SnapshotScope::unversioned(old)))?) else { continue };
            let own = taken.groups == ctx.key_groups && taken.keyed == Some(plan.keyed);
            if own || !plan.keyed {
                // This subtask's own snapshot, taken under the same routing: all of it. Behind a
                // source whose subtasks own partitions, which keys come here is the source's
                // choice, so every key is kept (those that never come expire), and of two copies
                // of a key the one written later.
                state.restore(files, &|_| true)?;
            } else if taken.keyed != Some(true) || groups_overlap(&taken.groups, &ctx.key_groups) {
                // Rows come here by key group: the entries of this subtask's groups, wherever
                // they were (a snapshot taken behind a partition-owning source holds any group).
                state.restore(files, &|group| ctx.key_groups.contains(&group))?;
            }
        }
        Ok(Memory {
            plan: plan.clone(),
            width,
            state,
            max_parallelism,
            key_groups: ctx.key_groups.clone(),
            watermark: i64::MIN,
            next_sweep: Instant::now(),
        })
    }

    /// Each row's key (encoded) and the key group it is stored under.
    fn keys(&self, batch: &Batch) -> Vec<(u32, Vec<u8>)> {
        let key = |row: &Vec<Value>| {
            let mut key = Vec::new();
            for &c in &self.plan.key {
                crate::codec::encode_value(&row[c], &mut key);
            }
            (crate::keys::key_group(crate::keys::hash_key(row, &self.plan.key), self.max_parallelism), key)
        };
        batch.rows.iter().map(key).collect()
    }

    /// Per row of `batch` (whose `keys` are given): for a retraction, the values its insert was
    /// joined with, if this lookup holds them (an insert earlier in the same batch counts: it is
    /// noted after the batch).
    fn recall(&mut self, batch: &Batch, keys: &[(u32, Vec<u8>)]) -> Result<Vec<Option<Vec<Value>>>> {
        let mut inserted_here: HashSet<&[u8]> = HashSet::new();
        let mut out = Vec::with_capacity(batch.len());
        for (op, (group, key)) in batch.ops.iter().zip(keys) {
            match op {
                Op::Insert => {
                    inserted_here.insert(key.as_slice());
                    out.push(None);
                }
                // Resolved once the insert is joined (see `note`); left to the lookup until then.
                Op::Retract if inserted_here.remove(key.as_slice()) => out.push(None),
                // Values of another width come from a savepoint of a lookup with other columns.
                Op::Retract => out.push(self.state.get(*group, key, self.watermark)?.filter(|v| v.len() == self.width)),
            }
        }
        Ok(out)
    }

    /// Notes what each row of `batch` (whose `keys` are given) was joined with: an insert's values
    /// are kept for its key, a retraction forgets the key.
    fn note(&mut self, batch: &Batch, keys: &[(u32, Vec<u8>)], joined: &[Vec<Value>]) -> Result<()> {
        // An event time past the horizon (a typo, a year 2200) is no time to keep a key by.
        let horizon = crate::operator::future_horizon_ms();
        for (((row, op), (group, key)), values) in batch.rows.iter().zip(&batch.ops).zip(keys).zip(joined) {
            match op {
                Op::Insert => {
                    let written = match self.plan.time.map(|t| &row[t]) {
                        Some(Value::Timestamp(t)) if *t <= horizon => *t,
                        _ => self.watermark,
                    };
                    self.state.put(*group, key, values, written)?
                }
                Op::Retract => self.state.delete(*group, key)?,
            }
        }
        Ok(())
    }

    fn advance(&mut self, watermark: i64) -> Result<()> {
        self.watermark = self.watermark.max(watermark);
        let now = Instant::now();
        if self.plan.ttl_ms.is_some() && now >= self.next_sweep {
            self.state.expire(self.watermark)?;
            self.next_sweep = now + SWEEP_INTERVAL;
        }
        Ok(())
    }

    fn snapshot(&mut self, scratch: &Path) -> Result<OperatorSnapshot> {
        let dir = scratch.join("joined");
        self.state.snapshot(&dir)?;
        let scope = SnapshotScope { groups: self.key_groups.clone(), keyed: Some(self.plan.keyed) };
        Ok(OperatorSnapshot::state(&scope).with_files(Some(dir)))
    }
}

/// What a memory snapshot holds (its inline state): the key groups its subtask owned, and
/// whether rows came to it by key or by the partitions its source owned.
#[derive(Serialize, Deserialize)]
struct SnapshotScope {
    groups: Range<u32>,
    /// `None` in snapshots written before the routing was recorded.
    keyed: Option<bool>,
}

impl InlineState for SnapshotScope {
    const HOLDER: &'static str = "postgres lookup";
    const VERSION: u8 = 1;
}

impl SnapshotScope {
    /// Before versioned state: the key groups' bounds as little-endian words, then a byte.
    fn unversioned(inline: &[u8]) -> Option<SnapshotScope> {
        let start = u32::from_le_bytes(inline.get(..4)?.try_into().ok()?);
        let end = u32::from_le_bytes(inline.get(4..8)?.try_into().ok()?);
        Some(SnapshotScope { groups: start..end, keyed: inline.get(8).map(|b| *b != 0) })
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
    use crate::operator::RestoredState;

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
        let Some(url) = crate::testing::service("EDDY_TEST_PG_URL", "postgres://user@host:port/db") else { return };
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
            cache_ttl: Duration::from_secs(60),
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

    /// Against a real server (`EDDY_TEST_PG_URL`): a content's title changes between an event's
    /// insert and its update. The update's retraction must carry the old title (what the insert
    /// got), also after a restore from a checkpoint, or a SUM over looked-up columns drifts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retraction_carries_what_its_insert_was_joined_with_after_the_dimension_changed() {
        let Some(url) = crate::testing::service("EDDY_TEST_PG_URL", "postgres://user@host:port/db") else { return };
        let (admin, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(connection);
        let table = format!("changing_dim_{}", std::process::id());
        admin
            .batch_execute(&format!("CREATE TABLE {table} (id text PRIMARY KEY, title text); INSERT INTO {table} VALUES ('c1', 'old');"))
            .await
            .unwrap();
        let options = PostgresLookupOptions {
            url: url.clone(),
            table: table.clone(),
            key: "id".into(),
            columns: "title VARCHAR".into(),
            cache_size: 10,
            // Every batch asks the table again.
            cache_ttl: Duration::ZERO,
        };
        let columns = eddy_jobs::connectors::parse_columns(&options.columns).unwrap();
        let memory = LookupMemory { key: vec![0], time: None, ttl_ms: None, keyed: false };
        let dir = crate::testing::temp_dir("lookup-memory");
        let ctx =
            |restore| OperatorContext { state_dir: dir.path().join("state"), key_groups: 0..128, restore, metrics: Default::default() };
        let open = |restore| {
            let options = options.clone();
            let columns = columns.clone();
            let memory = memory.clone();
            let ctx = ctx(restore);
            async move {
                let lookup = PostgresLookup::connect(&options, 1, &columns, Arc::default()).await.unwrap();
                lookup.remembering(Some(&memory), StateBackend::RocksDb, 128, &ctx).unwrap()
            }
        };
        let event = |version: i64| vec![Value::Int(1), Value::String("c1".into()), Value::Int(version)];
        let titles = |out: &Collector| -> Vec<(Op, Value)> {
            let batch = out.main.last().unwrap();
            batch.ops.iter().zip(&batch.rows).map(|(op, r)| (*op, r[3].clone())).collect()
        };
        let mut lookup = open(Vec::new()).await;
        let mut out = Collector::default();
        lookup.process_batch(Batch::inserts(vec![event(1)]), &mut out).await.unwrap();
        admin.batch_execute(&format!("UPDATE {table} SET title = 'new'")).await.unwrap();
        let update = Batch { rows: vec![event(1), event(2)], ops: vec![Op::Retract, Op::Insert] };
        lookup.process_batch(update, &mut out).await.unwrap();
        assert_eq!(titles(&out), vec![(Op::Retract, Value::String("old".into())), (Op::Insert, Value::String("new".into()))]);

        // A checkpoint, a changed title again, and a restored lookup: the delete's retraction
        // carries what the last insert got.
        let snapshot = lookup.snapshot(1, &dir.path().join("scratch")).await.unwrap();
        drop(lookup);
        admin.batch_execute(&format!("UPDATE {table} SET title = 'newer'")).await.unwrap();
        let mut restored = open(vec![RestoredState { inline: snapshot.inline, files: snapshot.files }]).await;
        restored.process_batch(Batch { rows: vec![event(2)], ops: vec![Op::Retract] }, &mut out).await.unwrap();
        admin.batch_execute(&format!("DROP TABLE {table}")).await.unwrap();
        assert_eq!(titles(&out), vec![(Op::Retract, Value::String("new".into()))]);
    }

    /// Against a real server (`EDDY_TEST_PG_URL`): the server ends the lookup's query in flight
    /// (as a restart or failover does, SQLSTATE 57P01); the lookup retries and answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_query_ended_by_the_server_is_retried() {
        let Some(url) = crate::testing::service("EDDY_TEST_PG_URL", "postgres://user@host:port/db") else { return };
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
            cache_ttl: Duration::from_secs(60),
        };
        let columns = eddy_jobs::connectors::parse_columns(&options.columns).unwrap();
        let mut lookup = PostgresLookup::connect(&options, 0, &columns, Arc::default()).await.unwrap();
        let fetch = tokio::spawn(async move { lookup.fetch(vec!["1".into()]).await });
        // Wait for the query to be running, then end it from the server side.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let ended = admin
                .query_one(
                    &format!("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query LIKE '%FROM \"{view}\" WHERE%' AND pid <> pg_backend_pid()"),
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
