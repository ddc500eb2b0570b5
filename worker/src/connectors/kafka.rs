//! The `kafka` source and sink, on rdkafka (librdkafka, built from source: Debian's 2.0.2 cannot
//! talk to every broker we meet).
//!
//! **Formats.** `upsert-json`: the key is a JSON object of the primary-key columns
//! (`{"id": 42}`), the value the whole row as a JSON object, and a null value (a tombstone) deletes
//! the key. `json`: values only, append-only. `raw` (sink only): the text of the row's single
//! VARCHAR column as the value, for payloads serialized upstream.
//!
//! **Source.** Subtask `i` of `n` reads the partitions `p` with `p % n == i` (assigned by Eddy, as
//! Flink's Kafka source does, so a restore knows which positions and keys each subtask owns); the
//! consumer group only records committed offsets, for lag and for a fresh start. In upsert mode it
//! keeps each key's last row (keys are partitioned, so each key lives in one subtask) and turns the
//! topic into a changelog: a new value for a known key retracts the old row and inserts the new
//! one; a tombstone retracts it. Re-reading a record therefore changes nothing downstream.
//!
//! The last rows live in a [`LastValueState`] sharded by partition, on the job's state backend
//! (RocksDB by default, under the task's directory). With `state_ttl`, a key not written for that
//! long is forgotten (by wall-clock time, as Flink's state TTL): its next version is then an insert
//! with no retraction, and a tombstone for it retracts nothing. The TTL must therefore exceed the
//! time downstream state still depends on the row (a window's size plus its lateness).
//!
//! With checkpoints, the next offset of every partition goes into each checkpoint inline, and the
//! upsert state as the state backend's files (incremental with RocksDB); a restore seeks to those
//! offsets, so every record after the checkpoint is read again exactly once into the restored
//! state, which keeps the partitions this subtask owns now. Offsets are committed
//! to the group when a checkpoint completes. Without checkpoints, offsets are stored once a batch
//! has been handed on and committed by librdkafka in the background (at least once). Malformed
//! records follow `bad_records`: fail the task, drop and count, or dead-letter to a file and count.
//!
//! **Sink.** An idempotent producer (`enable.idempotence`), `acks=all`. `write` returns once the
//! broker has acknowledged every record of the batch. An update arrives as a retraction followed by
//! an insert of the same key: the retraction is skipped; a lone retraction becomes a tombstone.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use eddy_jobs::connectors::{BadRecordPolicy, KafkaFormat, KafkaSinkOptions, KafkaSourceOptions};
use eddy_jobs::{Schema, Value};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use serde_json::Value as Json;
use tracing::warn;

use super::{ConnectorContext, Sink, Source};
use crate::batch::{Batch, Op};
use crate::error::{Result, TaskError};
use crate::json::{row_from_json, row_to_json};
use crate::operators::{OperatorSnapshot, RestoredState};
use crate::state::last_value::{self, LastValueState};
use crate::task::TaskMetrics;

const MAX_BATCH: usize = 1024;

/// Longest time between two sweeps of expired upsert state.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Collects librdkafka's statistics: the consumer's lag over its partitions.
struct LagContext {
    lag: Arc<AtomicI64>,
}

impl ClientContext for LagContext {
    fn stats(&self, stats: Statistics) {
        let lag: i64 = stats
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
            .map(|p| p.consumer_lag)
            .sum();
        self.lag.store(lag, Ordering::Relaxed);
    }
}

impl ConsumerContext for LagContext {}

/// A decoded record: its key identity (upsert format only) and its row (`None` for a tombstone).
type Decoded = (Option<Vec<u8>>, Option<Vec<Value>>);

/// Reads a topic as a changelog (upsert) or as appends (json).
pub struct KafkaSource {
    consumer: Arc<StreamConsumer<LagContext>>,
    options: KafkaSourceOptions,
    schema: Schema,
    key_columns: Vec<usize>,
    /// Upsert state: each key's current row, sharded by partition (`None` for the json format).
    current: Option<Box<dyn LastValueState>>,
    /// How long a key's row outlives its last write (`state_ttl`); forever with `None`.
    state_ttl_ms: Option<i64>,
    /// When to next remove expired upsert state (with a `state_ttl`).
    next_sweep: tokio::time::Instant,
    /// Highest offset handed out per partition, stored once handed on (without checkpoints).
    pending: HashMap<i32, i64>,
    /// Next offset to read per partition read so far (restored ones included).
    positions: HashMap<i32, i64>,
    /// Positions of checkpoints taken and not yet complete, committed when they are.
    snapshots: Vec<(u64, HashMap<i32, i64>)>,
    checkpointing: bool,
    subtask: u32,
    parallelism: u32,
    /// Whether this subtask's partitions are assigned yet (the topic may not exist yet).
    assigned: bool,
    next_discovery: tokio::time::Instant,
    /// Records taken from the consumer and not yet turned into a batch.
    received: Vec<OwnedMessage>,
    metrics: Arc<TaskMetrics>,
    lag: Arc<AtomicI64>,
    dead_letters: Option<std::fs::File>,
}

impl KafkaSource {
    /// Creates the consumer; partitions are assigned once the topic exists.
    pub fn start(o: &KafkaSourceOptions, ctx: ConnectorContext) -> Result<KafkaSource> {
        let lag = Arc::new(AtomicI64::new(0));
        let consumer: StreamConsumer<LagContext> = ClientConfig::new()
            .set("bootstrap.servers", &o.brokers)
            .set("group.id", &o.group_id)
            .set("client.id", format!("eddy-{}-{}", ctx.job_id, ctx.task))
            .set("auto.offset.reset", &o.start)
            .set("enable.auto.commit", if ctx.checkpointing { "false" } else { "true" })
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("statistics.interval.ms", "1000")
            // Latency: ask the broker to answer fetches within 10 ms even when it has little data
            // (librdkafka's default waits up to 500 ms).
            .set("fetch.wait.max.ms", "10")
            .create_with_context(LagContext { lag: lag.clone() })
            .map_err(|e| TaskError::external(format!("kafka consumer for {}: {e}", o.brokers)))?;
        let key_columns = o.primary_key.iter().filter_map(|k| ctx.schema.index_of(k)).collect();
        let dead_letters = match (&o.bad_records, &o.dead_letter_path) {
            (BadRecordPolicy::DeadLetter, Some(path)) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| TaskError::user(format!("dead-letter file `{path}`: {e}; check the directory exists")))?,
            ),
            _ => None,
        };
        let state_ttl_ms = o.state_ttl_ms().map_err(|e| TaskError::user(format!("kafka source: options.state_ttl: {e}")))?;
        let current = match o.format {
            KafkaFormat::UpsertJson => Some(last_value::open(ctx.state_backend, &ctx.state_dir.join("upsert"), state_ttl_ms)?),
            KafkaFormat::Json | KafkaFormat::Raw => None,
        };
        let mut source = KafkaSource {
            consumer: Arc::new(consumer),
            options: o.clone(),
            schema: ctx.schema.clone(),
            key_columns,
            current,
            state_ttl_ms,
            next_sweep: tokio::time::Instant::now(),
            pending: HashMap::new(),
            positions: HashMap::new(),
            snapshots: Vec::new(),
            checkpointing: ctx.checkpointing,
            subtask: ctx.task.subtask,
            parallelism: ctx.parallelism,
            assigned: false,
            next_discovery: tokio::time::Instant::now(),
            received: Vec::new(),
            metrics: ctx.metrics,
            lag,
            dead_letters,
        };
        if let Some((_, states)) = &ctx.restore {
            for state in states {
                source.restore(state)?;
            }
        }
        Ok(source)
    }

    fn owns(&self, partition: i32) -> bool {
        owns(partition, self.parallelism, self.subtask)
    }

    /// Takes the positions and keys this subtask owns from one earlier subtask's state.
    fn restore(&mut self, restored: &RestoredState) -> Result<()> {
        let (parallelism, subtask) = (self.parallelism, self.subtask);
        if let (Some(files), Some(current)) = (&restored.files, &mut self.current) {
            current.restore(files, &|shard| owns(shard as i32, parallelism, subtask))?;
        }
        let state = restored.inline.as_slice();
        if state.is_empty() {
            return Ok(());
        }
        let corrupt = || TaskError::internal("kafka source: corrupt checkpoint state");
        let n = u32::from_le_bytes(state.get(..4).ok_or_else(corrupt)?.try_into().map_err(|_| corrupt())?) as usize;
        let mut at = 4;
        for _ in 0..n {
            let p = i32::from_le_bytes(state.get(at..at + 4).ok_or_else(corrupt)?.try_into().map_err(|_| corrupt())?);
            let o = i64::from_le_bytes(state.get(at + 4..at + 12).ok_or_else(corrupt)?.try_into().map_err(|_| corrupt())?);
            at += 12;
            if self.owns(p) {
                self.positions.insert(p, o);
            }
        }
        // Checkpoints taken before the upsert state moved to the state backend hold it inline,
        // after the positions.
        if at == state.len() {
            return Ok(());
        }
        let now = now_ms();
        let crate::batch::Message::Data(rows) = crate::codec::decode(state.get(at..).ok_or_else(corrupt)?).map_err(|_| corrupt())? else {
            return Err(corrupt());
        };
        for mut row in rows.rows {
            let (Some(Value::Int(p)), Some(Value::String(key))) = (row.first().cloned(), row.get(1).cloned()) else {
                return Err(corrupt());
            };
            if let (true, Some(current)) = (self.owns(p as i32), &mut self.current) {
                current.put(p as u32, key.as_bytes(), &row.split_off(2), now)?;
            }
        }
        Ok(())
    }

    /// Assigns this subtask's partitions once the topic exists: at the restored positions, else
    /// at the group's committed offsets (or `start` without any).
    async fn assign(&mut self) -> Result<()> {
        while !self.assigned {
            tokio::time::sleep_until(self.next_discovery).await;
            self.next_discovery = tokio::time::Instant::now() + Duration::from_millis(500);
            let consumer = self.consumer.clone();
            let topic = self.options.topic.clone();
            let partitions = tokio::task::spawn_blocking(move || {
                consumer
                    .fetch_metadata(Some(&topic), Duration::from_secs(2))
                    .map(|m| m.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect::<Vec<i32>>())
            })
            .await
            .map_err(|e| TaskError::internal(format!("kafka metadata: {e}")))?;
            let partitions = match partitions {
                Ok(p) if !p.is_empty() => p,
                Ok(_) => continue, // the topic does not exist yet: its producer creates it
                Err(e) => {
                    warn!(topic = %self.options.topic, error = %e, "kafka: cannot read topic metadata; retrying");
                    continue;
                }
            };
            let mut list = TopicPartitionList::new();
            for p in partitions.into_iter().filter(|p| self.owns(*p)) {
                let offset = self.positions.get(&p).map_or(Offset::Stored, |o| Offset::Offset(*o));
                list.add_partition_offset(&self.options.topic, p, offset)
                    .map_err(|e| TaskError::internal(format!("kafka: {e}")))?;
            }
            self.consumer
                .assign(&list)
                .map_err(|e| TaskError::external(format!("kafka: assigning partitions of `{}`: {e}", self.options.topic)))?;
            self.assigned = true;
        }
        Ok(())
    }

    /// Decodes one record: its key identity (upsert format only) and its row (`None` for a
    /// tombstone).
    fn decode(&self, m: &OwnedMessage) -> std::result::Result<Decoded, String> {
        let value = match m.payload() {
            None => None,
            Some(bytes) => Some(row_from_json(&self.schema, &parse(bytes)?)?),
        };
        if self.options.format == KafkaFormat::Json {
            return Ok((None, value));
        }
        // Key identity: the record key's canonical JSON (or the value's key columns without one).
        let key = match (m.key(), &value) {
            (Some(k), _) => serde_json::to_vec(&parse(k)?).map_err(|e| e.to_string())?,
            (None, Some(row)) => {
                let cols: Vec<Json> = self.key_columns.iter().map(|&c| crate::json::to_json(&row[c])).collect();
                serde_json::to_vec(&cols).map_err(|e| e.to_string())?
            }
            (None, None) => return Err("a tombstone without a key".into()),
        };
        Ok((Some(key), value))
    }

    /// Turns a new value (or a tombstone) of `key` in `partition` into changelog rows.
    fn upsert(&mut self, partition: i32, key: &[u8], value: Option<Vec<Value>>, out: &mut Batch) -> Result<()> {
        let current = self.current.as_mut().ok_or_else(|| TaskError::internal("kafka source: upsert record without upsert state"))?;
        let (shard, now) = (partition as u32, now_ms());
        let previous = current.get(shard, key, now)?;
        match value {
            Some(row) => {
                // Written even when unchanged: a write keeps the key alive (`state_ttl`).
                current.put(shard, key, &row, now)?;
                if previous.as_ref() == Some(&row) {
                    return Ok(()); // a replay of what we already have
                }
                if let Some(p) = previous {
                    out.push(p, Op::Retract);
                }
                out.push(row, Op::Insert);
            }
            None => {
                if let Some(p) = previous {
                    current.delete(shard, key)?;
                    out.push(p, Op::Retract);
                }
            }
        }
        Ok(())
    }

    fn bad_record(&mut self, m: &OwnedMessage, error: String) -> Result<()> {
        let at = format!("topic {} partition {} offset {}", m.topic(), m.partition(), m.offset());
        match self.options.bad_records {
            BadRecordPolicy::Fail => Err(TaskError::user(format!(
                "malformed record at {at}: {error}; fix the producer, or set bad_records = \"drop\" or \"dead-letter\" on the source"
            ))),
            BadRecordPolicy::Drop => {
                warn!(%at, %error, "dropping malformed record");
                self.metrics.dead_lettered.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            BadRecordPolicy::DeadLetter => {
                let line = serde_json::json!({
                    "topic": m.topic(), "partition": m.partition(), "offset": m.offset(),
                    "key": m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    "value": m.payload().map(|v| String::from_utf8_lossy(v).into_owned()),
                    "error": error,
                });
                if let Some(f) = &mut self.dead_letters {
                    writeln!(f, "{line}").map_err(|e| TaskError::external(format!("writing the dead-letter file: {e}")))?;
                }
                self.metrics.dead_lettered.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    fn take_owned(&mut self, m: &OwnedMessage, out: &mut Batch) -> Result<()> {
        self.pending.insert(m.partition(), m.offset());
        self.positions.insert(m.partition(), m.offset() + 1);
        match self.decode(m) {
            Ok((Some(key), value)) => self.upsert(m.partition(), &key, value, out),
            Ok((None, value)) => {
                if let Some(row) = value {
                    out.push(row, Op::Insert);
                }
                Ok(())
            }
            Err(e) => self.bad_record(m, e),
        }
    }
}

/// Whether subtask `subtask` of `parallelism` reads `partition`.
fn owns(partition: i32, parallelism: u32, subtask: u32) -> bool {
    partition.rem_euclid(parallelism as i32) as u32 == subtask
}

/// Wall-clock time in Unix milliseconds, the clock of the upsert state's TTL.
fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn parse(bytes: &[u8]) -> std::result::Result<Json, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}"))
}

#[async_trait]
impl Source for KafkaSource {
    async fn next_batch(&mut self) -> Result<Option<Batch>> {
        // Received records wait in `self.received`, not in a local: if this future is dropped at
        // an await below (the runtime's select! may do so), nothing already taken from the
        // consumer is lost.
        self.assign().await?;
        if self.received.is_empty() {
            let first = self.consumer.recv().await.map_err(|e| TaskError::external(format!("kafka: {e}")))?;
            self.received.push(first.detach());
        }
        while self.received.len() < MAX_BATCH {
            match tokio::time::timeout(Duration::ZERO, self.consumer.recv()).await {
                Ok(Ok(m)) => self.received.push(m.detach()),
                Ok(Err(e)) => return Err(TaskError::external(format!("kafka: {e}"))),
                Err(_) => break,
            }
        }
        let mut batch = Batch::default();
        for m in std::mem::take(&mut self.received) {
            self.take_owned(&m, &mut batch)?;
        }
        Ok(Some(batch))
    }

    async fn handed_on(&mut self) -> Result<()> {
        if self.checkpointing {
            return Ok(()); // offsets are committed with checkpoints
        }
        for (partition, offset) in self.pending.drain() {
            // The stored offset is the next one to read.
            self.consumer
                .store_offset(&self.options.topic, partition, offset + 1)
                .map_err(|e| TaskError::external(format!("kafka: storing offset: {e}")))?;
        }
        Ok(())
    }

    async fn tick(&mut self) -> Result<()> {
        self.metrics.set_gauge("consumer_lag", self.lag.load(Ordering::Relaxed));
        if let (Some(ttl), Some(current)) = (self.state_ttl_ms, &mut self.current) {
            let now = tokio::time::Instant::now();
            if now >= self.next_sweep {
                current.expire(now_ms())?;
                self.next_sweep = now + SWEEP_INTERVAL.min(Duration::from_millis(ttl as u64));
            }
        }
        Ok(())
    }

    async fn snapshot(&mut self, id: u64, scratch: &Path) -> Result<OperatorSnapshot> {
        let mut inline = Vec::with_capacity(4 + self.positions.len() * 12);
        inline.extend_from_slice(&(self.positions.len() as u32).to_le_bytes());
        for (p, o) in &self.positions {
            inline.extend_from_slice(&p.to_le_bytes());
            inline.extend_from_slice(&o.to_le_bytes());
        }
        let files = match &mut self.current {
            Some(current) => {
                let dir = scratch.join("state");
                current.snapshot(&dir)?;
                Some(dir)
            }
            None => None,
        };
        self.snapshots.push((id, self.positions.clone()));
        Ok(OperatorSnapshot { inline, files })
    }

    async fn checkpoint_complete(&mut self, id: u64) -> Result<()> {
        let Some(i) = self.snapshots.iter().position(|(s, _)| *s == id) else { return Ok(()) };
        let (_, positions) = self.snapshots.remove(i);
        self.snapshots.drain(..i); // older ones are superseded
        let mut list = TopicPartitionList::new();
        for (p, o) in positions {
            list.add_partition_offset(&self.options.topic, p, Offset::Offset(o))
                .map_err(|e| TaskError::internal(format!("kafka: {e}")))?;
        }
        // Only for lag and fresh starts: a restore seeks to the checkpoint's own offsets. A failed
        // commit is therefore not worth failing the job for.
        if let Err(e) = self.consumer.commit(&list, CommitMode::Async) {
            warn!(topic = %self.options.topic, error = %e, "kafka: committing checkpoint offsets failed");
        }
        Ok(())
    }
}

/// Writes rows to a topic.
pub struct KafkaSink {
    producer: FutureProducer,
    options: KafkaSinkOptions,
    schema: Schema,
    key_columns: Vec<usize>,
}

impl KafkaSink {
    /// Creates the topic if it does not exist yet, then the producer.
    pub async fn start(o: &KafkaSinkOptions, ctx: ConnectorContext) -> Result<KafkaSink> {
        create_topic(o).await?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &o.brokers)
            .set("client.id", format!("eddy-{}-{}", ctx.job_id, ctx.task))
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .create()
            .map_err(|e| TaskError::external(format!("kafka producer for {}: {e}", o.brokers)))?;
        let key_columns = o.key.iter().filter_map(|k| ctx.schema.index_of(k)).collect();
        Ok(KafkaSink { producer, options: o.clone(), schema: ctx.schema.clone(), key_columns })
    }

    fn key(&self, row: &[Value]) -> Vec<u8> {
        let key = row_to_json(&self.schema, row, Some(&self.key_columns));
        serde_json::to_vec(&key).unwrap_or_default()
    }
}

/// Creates the sink's topic unless it exists.
async fn create_topic(o: &KafkaSinkOptions) -> Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &o.brokers)
        .create()
        .map_err(|e| TaskError::external(format!("kafka admin client for {}: {e}", o.brokers)))?;
    let topic = NewTopic::new(&o.topic, o.partitions.max(1), TopicReplication::Fixed(1));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics([&topic], &options)
        .await
        .map_err(|e| TaskError::external(format!("kafka: creating topic `{}`: {e}; is the broker at {} up?", o.topic, o.brokers)))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => return Err(TaskError::external(format!("kafka: creating topic `{t}`: {code}"))),
        }
    }
    Ok(())
}

#[async_trait]
impl Sink for KafkaSink {
    async fn write(&mut self, batch: Batch) -> Result<()> {
        let upsert = self.options.format == KafkaFormat::UpsertJson;
        let mut deliveries = Vec::with_capacity(batch.len());
        for (i, (row, op)) in batch.rows.iter().zip(&batch.ops).enumerate() {
            let key = if upsert { Some(self.key(row)) } else { None };
            let payload = match op {
                Op::Insert if self.options.format == KafkaFormat::Raw => match &row[0] {
                    Value::String(s) => Some(s.as_bytes().to_vec()),
                    _ => None,
                },
                Op::Insert => Some(serde_json::to_vec(&row_to_json(&self.schema, row, None)).unwrap_or_default()),
                Op::Retract if !upsert => continue, // an append-only topic has no way to say "delete"
                Op::Retract => {
                    let updated = batch.ops.get(i + 1) == Some(&Op::Insert)
                        && batch.rows.get(i + 1).map(|next| self.key(next)) == key;
                    if updated {
                        continue; // the "before" image of an update: the insert that follows replaces it
                    }
                    None
                }
            };
            let mut record: FutureRecord<'_, Vec<u8>, Vec<u8>> = FutureRecord::to(&self.options.topic);
            if let Some(k) = &key {
                record = record.key(k);
            }
            if let Some(p) = &payload {
                record = record.payload(p);
            }
            let delivery = self
                .producer
                .send_result(record)
                .map_err(|(e, _)| TaskError::external(format!("kafka: queueing a record for `{}`: {e}", self.options.topic)))?;
            deliveries.push(delivery);
        }
        for d in deliveries {
            match d.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    return Err(TaskError::external(format!("kafka: delivery to `{}` failed: {e}", self.options.topic)))
                }
                Err(_) => return Err(TaskError::external("kafka: producer dropped a delivery")),
            }
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<()> {
        use rdkafka::producer::Producer;
        self.producer
            .flush(Duration::from_secs(30))
            .map_err(|e| TaskError::external(format!("kafka: flushing `{}`: {e}", self.options.topic)))
    }
}
