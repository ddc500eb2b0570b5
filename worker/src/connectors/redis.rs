//! The `redis` leaderboard sink: a sorted set that always holds exactly one closed window's scores.
//!
//! Input rows are window results `(member, score, window_end)`. Rows for one window end may come
//! from several upstream subtasks, so they are buffered per window end until the watermark shows
//! the window complete (`window_end - 1 <= watermark`). Then only the newest complete window is
//! written (older complete ones are superseded and dropped) by one Lua script, atomically:
//!
//! 1. if the fence key `<key>:window_end` holds a window end `>= W`, do nothing (a replay after a
//!    crash, or a late older window, never moves the leaderboard backwards);
//! 2. build the new sorted set in `<key>:tmp` and `RENAME` it over `<key>` (or `DEL` `<key>` when
//!    the window has no rows), so a reader never sees a mix of two windows;
//! 3. set the fence to `W`.
//!
//! When the input is a window (the planner passes its slide), a window end that the watermark
//! passed without any rows is an empty window: the leaderboard is cleared for it, so that it
//! decays to empty when traffic stops instead of showing the last non-empty window for good.
//!
//! `finish` writes the newest buffered window. Rows with a NULL member or score are skipped.
//! Connection failures are retried under the connectors' shared policy ([`crate::retry`], up to
//! 5 minutes; a Redis restart or a short outage costs nothing but delay; meanwhile `on_watermark`
//! does not return, which backpressures upstream), then the task fails with an `external` error.
//! The sink must run with parallelism 1: each subtask would otherwise replace the others' part of
//! the window. In Redis Cluster the three keys need a common hash tag, e.g. `key = "{lb}leaderboard"`.
//! Gauge: `last_window_end` (the last window end written, Unix ms).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use eddy_jobs::connectors::RedisSinkOptions;
use eddy_jobs::{Row, Value};
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};

use crate::batch::{Batch, Op};
use crate::error::{Result, TaskError};
use crate::operator::{ConnectorContext, InlineState, OperatorSnapshot, Sink, Stage};
use crate::retry::Policy;

const TIMEOUT: Duration = Duration::from_secs(10);

/// KEYS: leaderboard, fence, temporary set. ARGV: window end, then score/member pairs.
/// Returns 1 when it replaced the leaderboard, 0 when the fence already held that window or a newer.
const REPLACE_SCRIPT: &str = r#"
local fence = redis.call('GET', KEYS[2])
if fence and tonumber(fence) and tonumber(fence) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('DEL', KEYS[3])
for i = 2, #ARGV, 2 do
  redis.call('ZADD', KEYS[3], ARGV[i], ARGV[i + 1])
end
if #ARGV > 1 then
  redis.call('RENAME', KEYS[3], KEYS[1])
else
  redis.call('DEL', KEYS[1])
end
redis.call('SET', KEYS[2], ARGV[1])
return 1
"#;

/// The leaderboard sink.
pub struct RedisLeaderboard {
    client: redis::Client,
    conn: Option<MultiplexedConnection>,
    /// The leaderboard; the fence and the temporary set are `<key>:window_end` and `<key>:tmp`.
    key: String,
    member: usize,
    score: usize,
    window_end: usize,
    /// Buffered rows by window end: member → score (a later row for a member replaces it).
    windows: Windows,
    /// The input window's slide, when known: windows end on its multiples.
    slide_ms: Option<i64>,
    /// The newest window end written (or found already written) by this instance.
    written: i64,
    ctx: ConnectorContext,
}

impl RedisLeaderboard {
    /// Checks the options and tries to connect. An unreachable Redis is not an error yet: the
    /// first write retries, as every write does.
    pub async fn connect(o: &RedisSinkOptions, ctx: ConnectorContext) -> Result<RedisLeaderboard> {
        if ctx.parallelism > 1 {
            return Err(TaskError::user(format!(
                "redis sink: runs with parallelism {} but needs parallelism 1 (each subtask would replace the others' part of a window); set `parallelism = 1` on the sink",
                ctx.parallelism
            )));
        }
        let column = |name: &str, what: &str| {
            ctx.schema.index_of(name).ok_or_else(|| {
                TaskError::user(format!("redis sink: options.{what}: no input column `{name}`; columns are {}", ctx.schema.names()))
            })
        };
        let (member, score, window_end) = (column(&o.member, "member")?, column(&o.score, "score")?, column(&o.window_end, "window_end")?);
        let client = redis::Client::open(o.url.as_str())
            .map_err(|e| TaskError::user(format!("redis sink: options.url `{}`: {e}", eddy_jobs::connectors::redact_url(&o.url))))?;
        // Window results that waited for their window's end when the checkpoint was taken.
        let mut windows = Windows::default();
        for state in ctx.restore.iter().flat_map(|(_, states)| states) {
            let Some(restored) = state.read(|old| Windows::unversioned(old).map(Some))? else { continue };
            for (end, scores) in restored.by_end {
                windows.by_end.entry(end).or_default().extend(scores);
            }
        }
        let mut sink = RedisLeaderboard {
            client,
            conn: None,
            key: o.key.clone(),
            member,
            score,
            window_end,
            windows,
            slide_ms: o.window_slide_ms.filter(|s| *s > 0),
            written: i64::MIN,
            ctx,
        };
        if let Err(e) = sink.connection().await {
            tracing::warn!(job_id = %sink.ctx.job_id, task = %sink.ctx.task, error = %e, "redis sink: Redis unreachable at start; will retry on the first write");
        }
        Ok(sink)
    }

    async fn connection(&mut self) -> redis::RedisResult<MultiplexedConnection> {
        if let Some(conn) = &self.conn {
            return Ok(conn.clone());
        }
        let config = redis::AsyncConnectionConfig::new().set_connection_timeout(TIMEOUT).set_response_timeout(TIMEOUT);
        let conn = self.client.get_multiplexed_async_connection_with_config(&config).await?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    /// Replaces the leaderboard with window `end`'s scores, retrying while Redis is unreachable.
    async fn replace(&mut self, end: i64, scores: &BTreeMap<String, f64>) -> Result<()> {
        let script = redis::Script::new(REPLACE_SCRIPT);
        let mut invocation = script.prepare_invoke();
        invocation.key(&self.key).key(format!("{}:window_end", self.key)).key(format!("{}:tmp", self.key)).arg(end);
        for (member, score) in scores {
            invocation.arg(*score).arg(member.as_str());
        }
        let mut retry = Policy::DEFAULT.start_reporting(&self.ctx.metrics, "redis sink");
        let replaced = loop {
            let outcome = match self.connection().await {
                Ok(mut conn) => invocation.invoke_async::<i64>(&mut conn).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(replaced) => break replaced,
                Err(e) if !transient(&e) => {
                    return Err(TaskError::external(format!("redis sink: replacing `{}` with window {end}: {e}", self.key)));
                }
                Err(e) => {
                    self.conn = None;
                    let Some(delay) = retry.next_delay_after(&e) else {
                        return Err(TaskError::external(format!(
                            "redis sink: Redis unreachable for {}s ({} retries): {e}; check that Redis is up",
                            retry.elapsed().as_secs(),
                            retry.failures()
                        )));
                    };
                    tracing::warn!(job_id = %self.ctx.job_id, task = %self.ctx.task, attempt = retry.failures(), error = %e, ?delay, "redis sink: Redis unreachable; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        };
        self.written = self.written.max(end);
        if retry.failures() > 0 {
            tracing::info!(job_id = %self.ctx.job_id, task = %self.ctx.task, attempt = retry.failures(), "redis sink: Redis reachable again");
        }
        if replaced == 1 {
            self.ctx.metrics.set_gauge("last_window_end", end);
            tracing::debug!(job_id = %self.ctx.job_id, task = %self.ctx.task, window_end = end, members = scores.len(), "redis sink: leaderboard replaced");
        } else {
            tracing::info!(job_id = %self.ctx.job_id, task = %self.ctx.task, window_end = end, "redis sink: the leaderboard already holds this window or a newer one; skipped");
        }
        Ok(())
    }
}

/// Connection-level failures and a server that is loading or failing over pass with time.
fn transient(e: &redis::RedisError) -> bool {
    use redis::ErrorKind as K;
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(e.kind(), K::BusyLoadingError | K::TryAgain | K::ClusterDown | K::MasterDown)
}

#[async_trait]
impl Stage for RedisLeaderboard {
    async fn snapshot(&mut self, _id: u64, _scratch: &Path) -> Result<OperatorSnapshot> {
        // Buffered windows were fired before the barrier: a restore must not lose them.
        Ok(OperatorSnapshot::state(&self.windows))
    }
}

#[async_trait]
impl Sink for RedisLeaderboard {
    async fn write(&mut self, batch: Batch) -> Result<()> {
        for (row, op) in batch.rows.iter().zip(&batch.ops) {
            self.windows.add(row, *op, self.member, self.score, self.window_end);
        }
        Ok(())
    }

    async fn on_watermark(&mut self, watermark: i64) -> Result<()> {
        let newest = self.windows.take_newest_complete(watermark);
        // The last window that closed by this watermark; with no rows for it, it is empty.
        let closed = self.slide_ms.filter(|_| watermark < i64::MAX).map(|slide| watermark.saturating_add(1).div_euclid(slide) * slide);
        match (newest, closed) {
            (Some((end, scores)), closed) if closed.is_none_or(|c| end >= c) => self.replace(end, &scores).await,
            (_, Some(closed)) if closed > self.written => self.replace(closed, &BTreeMap::new()).await,
            _ => Ok(()),
        }
    }

    async fn finish(&mut self) -> Result<()> {
        let Some((end, scores)) = self.windows.take_newest_complete(i64::MAX) else { return Ok(()) };
        self.replace(end, &scores).await
    }
}

/// Window results buffered until their window is complete.
#[derive(Default, Serialize, Deserialize)]
struct Windows {
    by_end: BTreeMap<i64, BTreeMap<String, f64>>,
}

impl InlineState for Windows {
    const HOLDER: &'static str = "redis sink";
    const VERSION: u8 = 1;
}

impl Windows {
    /// The state as checkpoints before versioned state held it: the exchange's encoding of
    /// `(window_end, member, score)` rows.
    fn unversioned(inline: &[u8]) -> Result<Windows> {
        let Ok(crate::batch::Message::Data(rows)) = crate::codec::decode(inline) else {
            return Err(TaskError::internal("redis sink: corrupt checkpoint state"));
        };
        let mut windows = Windows::default();
        for row in rows.rows {
            if let [Value::Int(end), Value::String(member), Value::Float(score)] = row.as_slice() {
                windows.by_end.entry(*end).or_default().insert(member.to_string(), *score);
            }
        }
        Ok(windows)
    }

    /// Buffers one result row. A retraction removes the member's score from that window (window
    /// results are final, so this only happens with upstreams that revise them).
    fn add(&mut self, row: &Row, op: Op, member: usize, score: usize, window_end: usize) {
        let Some(Value::Timestamp(end) | Value::Int(end)) = row.get(window_end) else { return };
        let member = match row.get(member) {
            Some(Value::String(s)) => s.to_string(),
            Some(Value::Int(i) | Value::Timestamp(i)) => i.to_string(),
            Some(Value::Float(f)) => f.to_string(),
            Some(Value::Bool(b)) => b.to_string(),
            Some(Value::Null) | None => return,
        };
        let window = self.by_end.entry(*end).or_default();
        match op {
            Op::Retract => {
                window.remove(&member);
            }
            Op::Insert => {
                let score = match row.get(score) {
                    Some(Value::Float(f)) if f.is_finite() => *f,
                    Some(Value::Int(i)) => *i as f64,
                    _ => return,
                };
                window.insert(member, score);
            }
        }
    }

    /// Removes every complete window (`end - 1 <= watermark`) and returns the newest of them; the
    /// older ones are superseded by it.
    fn take_newest_complete(&mut self, watermark: i64) -> Option<(i64, BTreeMap<String, f64>)> {
        let incomplete = watermark.checked_add(2).map(|first_incomplete| self.by_end.split_off(&first_incomplete)).unwrap_or_default();
        let complete = std::mem::replace(&mut self.by_end, incomplete);
        complete.into_iter().next_back()
    }
}

#[cfg(test)]
mod tests {

    use eddy_jobs::{DataType, Field, Schema, TaskId};
    use tokio::time::Instant;

    use super::*;
    use crate::operator::RestoredState;

    fn result(member: &str, score: f64, end: i64) -> Row {
        vec![Value::string(member), Value::Float(score), Value::Timestamp(end)]
    }

    fn windows(rows: &[Row]) -> Windows {
        let mut w = Windows::default();
        for r in rows {
            w.add(r, Op::Insert, 0, 1, 2);
        }
        w
    }

    /// Windows buffered at a checkpoint come back on restore, also from a checkpoint written
    /// before versioned state, whose layout (the exchange's encoding of result rows) is pinned
    /// here as bytes: a change of the exchange codec must not break it.
    #[test]
    fn buffered_windows_restore_from_versioned_and_older_checkpoints() {
        let buffered = windows(&[result("a", 5.0, 10_000), result("b", 1.5, 10_000), result("a", 2.0, 20_000)]);
        let state = RestoredState { inline: OperatorSnapshot::state(&buffered).inline, files: None };
        assert_eq!(state.state::<Windows>().unwrap().unwrap().by_end, buffered.by_end);
        const UNVERSIONED: &str = "01000300000000030002102700000000000004010000006103000000000000144000030002102700000000000004\
            010000006203000000000000f83f00030002204e000000000000040100000061030000000000000040";
        let bytes: Vec<u8> = (0..UNVERSIONED.len()).step_by(2).map(|i| u8::from_str_radix(&UNVERSIONED[i..i + 2], 16).unwrap()).collect();
        assert_eq!(Windows::unversioned(&bytes).unwrap().by_end, buffered.by_end);
        assert!(Windows::unversioned(&bytes[..20]).is_err(), "a cut-off state is refused");
    }

    #[test]
    fn newest_complete_window_wins_and_older_ones_are_dropped() {
        let mut w = windows(&[result("a", 1.0, 10_000), result("b", 2.0, 10_000), result("a", 3.0, 15_000), result("c", 4.0, 20_000)]);
        // Nothing is complete before the watermark reaches end - 1.
        assert!(w.take_newest_complete(9_998).is_none());
        let (end, scores) = w.take_newest_complete(14_999).unwrap();
        assert_eq!(end, 15_000);
        assert_eq!(scores.into_iter().collect::<Vec<_>>(), vec![("a".to_string(), 3.0)]);
        // Window 10 000 was superseded and dropped; 20 000 is still buffered.
        assert_eq!(w.by_end.keys().copied().collect::<Vec<_>>(), vec![20_000]);
        assert!(w.take_newest_complete(15_000).is_none());
        assert_eq!(w.take_newest_complete(i64::MAX).unwrap().0, 20_000);
        assert!(w.by_end.is_empty());
    }

    #[test]
    fn rows_from_several_subtasks_merge_and_nulls_are_skipped() {
        let mut w = windows(&[result("a", 1.0, 5_000), result("b", 2.0, 5_000)]);
        w.add(&vec![Value::Null, Value::Float(1.0), Value::Timestamp(5_000)], Op::Insert, 0, 1, 2);
        w.add(&vec![Value::string("n"), Value::Null, Value::Timestamp(5_000)], Op::Insert, 0, 1, 2);
        w.add(&vec![Value::string("i"), Value::Int(7), Value::Timestamp(5_000)], Op::Insert, 0, 1, 2);
        w.add(&result("b", 2.0, 5_000), Op::Retract, 0, 1, 2);
        let (_, scores) = w.take_newest_complete(4_999).unwrap();
        assert_eq!(scores.into_iter().collect::<Vec<_>>(), vec![("a".to_string(), 1.0), ("i".to_string(), 7.0)]);
    }

    fn ctx(parallelism: u32) -> ConnectorContext {
        let schema = Schema::new(vec![
            Field::new("content_id", DataType::String),
            Field::new("score", DataType::Float),
            Field::new("window_end", DataType::Timestamp),
        ]);
        ConnectorContext::for_test(TaskId { vertex: 3, subtask: 0 }, parallelism, schema)
    }

    fn options(url: &str, key: &str) -> RedisSinkOptions {
        RedisSinkOptions {
            url: url.into(),
            key: key.into(),
            member: "content_id".into(),
            score: "score".into(),
            window_end: "window_end".into(),
            window_slide_ms: None,
        }
    }

    #[tokio::test]
    async fn refuses_parallel_instances() {
        let e = RedisLeaderboard::connect(&options("redis://127.0.0.1:1", "lb"), ctx(2)).await.err().unwrap();
        assert_eq!(e.blame, crate::error::Blame::User);
    }

    /// The Redis URL for integration tests, or `None` (with a note) to skip them.
    fn redis_url() -> Option<String> {
        crate::testing::service("EDDY_TEST_REDIS_URL", "redis://127.0.0.1:PORT")
    }

    async fn leaderboard(url: &str, key: &str) -> (Vec<(String, f64)>, Option<i64>) {
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let set: Vec<(String, f64)> = redis::cmd("ZRANGE").arg(key).arg(0).arg(-1).arg("WITHSCORES").query_async(&mut conn).await.unwrap();
        let fence: Option<i64> = redis::cmd("GET").arg(format!("{key}:window_end")).query_async(&mut conn).await.unwrap();
        (set, fence)
    }

    async fn clear(url: &str, key: &str) {
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () =
            redis::cmd("DEL").arg(key).arg(format!("{key}:window_end")).arg(format!("{key}:tmp")).query_async(&mut conn).await.unwrap();
    }

    /// Serialises the tests that share the server (one of them stops it).
    static SERVER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    #[tokio::test]
    async fn redis_holds_exactly_the_newest_window_and_never_goes_back() {
        let Some(url) = redis_url() else { return };
        let _server = SERVER.lock().await;
        let key = format!("eddy-test-lb-{}", std::process::id());
        clear(&url, &key).await;
        let c = ctx(1);
        let metrics = c.metrics.clone();
        let mut sink = RedisLeaderboard::connect(&options(&url, &key), c).await.unwrap();

        // Window 10 s, then window 20 s (two upstream subtasks' halves), with the watermark between.
        sink.write(Batch::inserts(vec![result("a", 5.0, 10_000), result("b", 1.5, 10_000)])).await.unwrap();
        sink.on_watermark(9_999).await.unwrap();
        assert_eq!(leaderboard(&url, &key).await, (vec![("b".into(), 1.5), ("a".into(), 5.0)], Some(10_000)));
        sink.write(Batch::inserts(vec![result("b", 7.0, 20_000)])).await.unwrap();
        sink.write(Batch::inserts(vec![result("c", 2.0, 20_000), result("d", 3.0, 30_000)])).await.unwrap();
        sink.on_watermark(25_000).await.unwrap();
        // Exactly window 20's members: `a` (only in window 10) is gone, `d` (window 30) not yet in.
        assert_eq!(leaderboard(&url, &key).await, (vec![("c".into(), 2.0), ("b".into(), 7.0)], Some(20_000)));
        assert_eq!(metrics.gauges().get("last_window_end"), Some(&20_000));

        // A replay after a crash: a new instance writes window 10 again. Nothing changes.
        let mut replay = RedisLeaderboard::connect(&options(&url, &key), ctx(1)).await.unwrap();
        replay.write(Batch::inserts(vec![result("a", 5.0, 10_000), result("z", 99.0, 10_000)])).await.unwrap();
        replay.on_watermark(10_000).await.unwrap();
        replay.finish().await.unwrap();
        assert_eq!(leaderboard(&url, &key).await, (vec![("c".into(), 2.0), ("b".into(), 7.0)], Some(20_000)));

        // An empty window (a retraction left nothing) deletes the set; finish flushes window 30.
        sink.finish().await.unwrap();
        assert_eq!(leaderboard(&url, &key).await, (vec![("d".into(), 3.0)], Some(30_000)));
        let mut empty = RedisLeaderboard::connect(&options(&url, &key), ctx(1)).await.unwrap();
        empty.write(Batch { rows: vec![result("d", 3.0, 40_000)], ops: vec![Op::Retract] }).await.unwrap();
        empty.finish().await.unwrap();
        assert_eq!(leaderboard(&url, &key).await, (vec![], Some(40_000)));
        clear(&url, &key).await;
    }

    /// Behind a window (slide 5 s): once the watermark passes a window end that brought no rows,
    /// that window is empty and the leaderboard is cleared, instead of keeping the last non-empty
    /// window for good.
    #[tokio::test]
    async fn redis_leaderboard_decays_to_empty_when_windows_are_empty() {
        let Some(url) = redis_url() else { return };
        let _server = SERVER.lock().await;
        let key = format!("eddy-test-lb-decay-{}", std::process::id());
        clear(&url, &key).await;
        let mut o = options(&url, &key);
        o.window_slide_ms = Some(5_000);
        let mut sink = RedisLeaderboard::connect(&o, ctx(1)).await.unwrap();
        sink.write(Batch::inserts(vec![result("a", 5.0, 10_000)])).await.unwrap();
        sink.on_watermark(9_999).await.unwrap();
        assert_eq!(leaderboard(&url, &key).await, (vec![("a".into(), 5.0)], Some(10_000)));
        // Window 15 000 closes with no rows: it is empty.
        sink.on_watermark(15_200).await.unwrap();
        assert_eq!(leaderboard(&url, &key).await, (vec![], Some(15_000)));
        // A later non-empty window shows again.
        sink.write(Batch::inserts(vec![result("b", 1.0, 25_000)])).await.unwrap();
        sink.on_watermark(24_999).await.unwrap();
        assert_eq!(leaderboard(&url, &key).await, (vec![("b".into(), 1.0)], Some(25_000)));
        clear(&url, &key).await;
    }

    /// Stops Redis for ~5 s (with the script named by `EDDY_TEST_SERVICES_CTL`, e.g.
    /// `scripts/services.sh`) while a window is due: the write waits and then lands.
    #[tokio::test]
    async fn redis_outage_delays_but_does_not_fail() {
        let Some(url) = redis_url() else { return };
        let Some(ctl) = crate::testing::service("EDDY_TEST_SERVICES_CTL", "scripts/services.sh") else { return };
        let _server = SERVER.lock().await;
        let key = format!("eddy-test-lb-outage-{}", std::process::id());
        clear(&url, &key).await;
        let mut sink = RedisLeaderboard::connect(&options(&url, &key), ctx(1)).await.unwrap();
        sink.write(Batch::inserts(vec![result("a", 1.0, 5_000)])).await.unwrap();
        sink.on_watermark(5_000).await.unwrap();
        let run = |arg: &'static str| {
            let ctl = ctl.clone();
            async move {
                let status = tokio::process::Command::new(&ctl).args(arg.split(' ')).status().await.unwrap();
                assert!(status.success(), "{ctl} {arg} failed");
            }
        };
        run("stop redis").await;
        let start = run("start redis");
        let restart = tokio::spawn(async move {
            // The issue's outage: 20 seconds.
            tokio::time::sleep(Duration::from_secs(20)).await;
            start.await;
        });
        let started = Instant::now();
        sink.write(Batch::inserts(vec![result("b", 2.0, 10_000), result("c", 3.0, 10_000)])).await.unwrap();
        sink.on_watermark(10_000).await.unwrap();
        assert!(started.elapsed() >= Duration::from_secs(4), "the write should have waited for Redis");
        restart.await.unwrap();
        // Redis runs without persistence here, so the restart emptied it: only window 10 s is there.
        assert_eq!(leaderboard(&url, &key).await, (vec![("b".into(), 2.0), ("c".into(), 3.0)], Some(10_000)));
        clear(&url, &key).await;
    }
}
