//! A table's snapshot cut into chunks of pages (`ctid` ranges, read by PostgreSQL's TID range
//! scan: no `OFFSET`, no sort, no `COUNT(*)`), each read with `COPY (SELECT …) TO STDOUT`, and
//! the progress of reading them.
//!
//! The plan is made once, inside the snapshot: the table's size in pages then, cut into chunks of
//! `snapshot_chunk_pages`, the last one open-ended. Every page a row of the snapshot can be on is
//! below that size (a table only shrinks by losing empty trailing pages, and the snapshot's rows
//! keep theirs), so the chunks cover the snapshot whatever happens to the table while it is read.
//! Checkpoints record the plan and which chunks were handed on; a restart reads the others from a
//! new snapshot under the same plan. Rows only move to another page when they change (the stream
//! carries that change), so the same ranges still hold every row not yet read, unless the table
//! was rewritten meanwhile (`VACUUM FULL`, `CLUSTER`, a rewriting `ALTER TABLE`): its file node
//! changes, and then every chunk is read again.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_postgres::{Client, CopyOutStream};
use tokio_stream::StreamExt;

use super::pg_error;
use crate::error::Result;
use crate::operator::TaskMetrics;

/// How a snapshot is cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChunkPlan {
    /// The table's file node when the plan was made (it changes when the table is rewritten).
    pub relfilenode: u32,
    /// Pages per chunk.
    pub pages: u32,
    /// Chunks; the last one also reads every page past the others.
    pub total: u32,
    /// The table's estimated rows (`pg_class.reltuples`; 0 when never estimated).
    pub estimated_rows: i64,
}

impl ChunkPlan {
    /// The plan for the table `oid` as the client's transaction sees it. Before PostgreSQL 14,
    /// which has no TID range scan (each chunk would read the whole table), one chunk.
    pub async fn make(client: &Client, oid: u32, pages: u32) -> Result<ChunkPlan> {
        let sql = "SELECT pg_relation_filenode(c.oid)::text::bigint, \
                          pg_relation_size(c.oid) / current_setting('block_size')::bigint, \
                          greatest(c.reltuples, 0)::bigint, current_setting('server_version_num')::int >= 140000 \
                   FROM pg_class c WHERE c.oid = $1";
        let row = client.query_one(sql, &[&oid]).await.map_err(|e| pg_error("postgres_cdc: sizing the snapshot", e))?;
        let (node, size, estimated_rows, ranges): (i64, i64, i64, bool) = (row.get(0), row.get(1), row.get(2), row.get(3));
        let total = if ranges { ChunkPlan::chunks(size as u64, pages) } else { 1 };
        Ok(ChunkPlan { relfilenode: node as u32, pages, total, estimated_rows })
    }

    fn chunks(size: u64, pages: u32) -> u32 {
        size.div_ceil(u64::from(pages)).clamp(1, u64::from(u32::MAX)) as u32
    }

    /// One chunk, the whole table: the plan of checkpoints from before chunks.
    pub fn whole() -> ChunkPlan {
        ChunkPlan { relfilenode: 0, pages: u32::MAX, total: 1, estimated_rows: 0 }
    }

    /// The `WHERE` clause of chunk `n` (empty for a plan of one chunk).
    pub fn filter(&self, n: u32) -> String {
        let from = u64::from(n) * u64::from(self.pages);
        let to = from + u64::from(self.pages);
        match (n, n + 1 == self.total) {
            (0, true) => String::new(),
            (0, false) => format!(" WHERE ctid < '({to},0)'::tid"),
            (_, true) => format!(" WHERE ctid >= '({from},0)'::tid"),
            (_, false) => format!(" WHERE ctid >= '({from},0)'::tid AND ctid < '({to},0)'::tid"),
        }
    }

    /// The rows estimated in `chunks` of the chunks.
    pub fn estimate(&self, chunks: usize) -> i64 {
        self.estimated_rows.saturating_mul(chunks as i64) / i64::from(self.total.max(1))
    }

    /// The chunks subtask `subtask` of `parallelism` reads when a new job shares the snapshot out.
    pub fn share(&self, subtask: u32, parallelism: u32) -> Vec<u32> {
        (0..self.total).filter(|n| n % parallelism.max(1) == subtask).collect()
    }
}

/// A plan and the chunks of it handed on (sorted), as checkpoints hold them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChunksDone {
    pub plan: ChunkPlan,
    pub done: Vec<u32>,
}

impl ChunksDone {
    /// Nothing to read: no snapshot, or one read completely under a plan of no chunks.
    pub fn nothing() -> ChunksDone {
        ChunksDone { plan: ChunkPlan { total: 0, ..ChunkPlan::whole() }, done: Vec::new() }
    }

    pub fn complete(&self) -> bool {
        self.done.len() as u64 >= u64::from(self.plan.total)
    }

    pub fn mark(&mut self, n: u32) {
        if let Err(at) = self.done.binary_search(&n) {
            self.done.insert(at, n);
        }
    }

    /// Adds what another subtask handed on under the same plan.
    pub fn merge(&mut self, other: &ChunksDone) {
        if other.plan == self.plan {
            for n in &other.done {
                self.mark(*n);
            }
        }
    }

    /// The chunks not handed on yet.
    pub fn remaining(&self) -> Vec<u32> {
        (0..self.plan.total).filter(|n| self.done.binary_search(n).is_err()).collect()
    }
}

/// One chunk's rows, each a line of `COPY … TO STDOUT` text output.
pub(crate) struct ChunkRows {
    stream: std::pin::Pin<Box<CopyOutStream>>,
    /// Data received and not yet returned, and where its next line starts.
    data: Bytes,
    at: usize,
    /// A line split across messages, gathered.
    partial: Vec<u8>,
}

impl ChunkRows {
    /// Starts copying chunk `n` of `plan` out of `select` (`SELECT columns FROM table`).
    pub async fn open(client: &Client, select: &str, plan: &ChunkPlan, n: u32) -> Result<ChunkRows> {
        let sql = format!("COPY ({select}{}) TO STDOUT", plan.filter(n));
        let stream = client.copy_out(&sql).await.map_err(|e| pg_error("postgres_cdc: reading a snapshot chunk", e))?;
        Ok(ChunkRows { stream: Box::pin(stream), data: Bytes::new(), at: 0, partial: Vec::new() })
    }

    /// The next row's line (without its newline), `None` at the chunk's end.
    pub async fn next(&mut self) -> Result<Option<Bytes>> {
        loop {
            if let Some(end) = self.data[self.at..].iter().position(|b| *b == b'\n') {
                let line = self.data.slice(self.at..self.at + end);
                self.at += end + 1;
                if self.partial.is_empty() {
                    return Ok(Some(line));
                }
                self.partial.extend_from_slice(&line);
                return Ok(Some(Bytes::from(std::mem::take(&mut self.partial))));
            }
            self.partial.extend_from_slice(&self.data[self.at..]);
            match self.stream.next().await {
                Some(data) => {
                    self.data = data.map_err(|e| pg_error("postgres_cdc: reading a snapshot chunk", e))?;
                    self.at = 0;
                }
                None => {
                    self.data = Bytes::new();
                    self.at = 0;
                    return Ok(None);
                }
            }
        }
    }
}

/// The figures of a snapshot (or a backfill) being read, as gauges under `what`: rows done and
/// estimated in all, chunks done and in all, rows per second since the start and the seconds left
/// at that rate (`snapshot_rows_done`, …, `snapshot_eta_seconds`).
pub(crate) struct SnapshotProgress {
    metrics: Arc<TaskMetrics>,
    what: &'static str,
    started: Instant,
    rows: i64,
    estimated: i64,
    chunks: i64,
    last: Option<Instant>,
}

/// How often the rate and the time left are recomputed.
const RATE_EVERY: Duration = Duration::from_millis(500);

impl SnapshotProgress {
    /// A reading of `chunks` chunks, of `estimated` rows in all: a snapshot's.
    pub fn start(metrics: Arc<TaskMetrics>, estimated: i64, chunks: usize) -> SnapshotProgress {
        SnapshotProgress::of("snapshot", metrics, estimated, chunks)
    }

    /// A reading whose figures are named `what_…`.
    pub fn of(what: &'static str, metrics: Arc<TaskMetrics>, estimated: i64, chunks: usize) -> SnapshotProgress {
        let progress = SnapshotProgress { metrics, what, started: Instant::now(), rows: 0, estimated, chunks: 0, last: None };
        progress.set("rows_total", estimated);
        progress.set("rows_done", 0);
        progress.set("chunks_total", chunks as i64);
        progress.set("chunks_done", 0);
        progress
    }

    fn set(&self, figure: &str, value: i64) {
        self.metrics.set_gauge(&format!("{}_{figure}", self.what), value);
    }

    /// `n` more rows read.
    pub fn rows(&mut self, n: usize) {
        self.rows += n as i64;
        self.set("rows_done", self.rows);
        if self.last.is_none_or(|t| t.elapsed() >= RATE_EVERY) {
            self.last = Some(Instant::now());
            let seconds = self.started.elapsed().as_secs_f64().max(1e-3);
            let rate = self.rows as f64 / seconds;
            self.set("rows_per_second", rate as i64);
            if self.estimated > self.rows && rate > 0.0 {
                self.set("eta_seconds", ((self.estimated - self.rows) as f64 / rate).ceil() as i64);
            }
        }
    }

    pub fn chunk_done(&mut self) {
        self.chunks += 1;
        self.set("chunks_done", self.chunks);
    }

    /// The reading ended: the total is what was read.
    pub fn finish(&mut self) -> i64 {
        self.set("rows_total", self.rows);
        self.set("eta_seconds", 0);
        let seconds = self.started.elapsed().as_secs_f64().max(1e-3);
        self.set("rows_per_second", (self.rows as f64 / seconds) as i64);
        self.rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_pages_and_the_rest() {
        let plan = ChunkPlan { relfilenode: 1, pages: 100, total: ChunkPlan::chunks(250, 100), estimated_rows: 0 };
        assert_eq!(plan.total, 3);
        assert_eq!(plan.filter(0), " WHERE ctid < '(100,0)'::tid");
        assert_eq!(plan.filter(1), " WHERE ctid >= '(100,0)'::tid AND ctid < '(200,0)'::tid");
        assert_eq!(plan.filter(2), " WHERE ctid >= '(200,0)'::tid", "the last chunk reads past the plan's size");
        assert_eq!(ChunkPlan::chunks(0, 100), 1, "an empty table is one chunk");
        assert_eq!(ChunkPlan::whole().filter(0), "");
        assert_eq!(plan.share(0, 2), [0, 2]);
        assert_eq!(plan.share(1, 2), [1]);
    }

    #[test]
    fn done_chunks_merge_under_one_plan_only() {
        let plan = ChunkPlan { relfilenode: 1, pages: 100, total: 4, estimated_rows: 0 };
        let mut a = ChunksDone { plan, done: vec![2] };
        a.mark(0);
        a.mark(2);
        a.merge(&ChunksDone { plan, done: vec![1, 2] });
        a.merge(&ChunksDone { plan: ChunkPlan { relfilenode: 2, ..plan }, done: vec![3] });
        assert_eq!(a.done, [0, 1, 2]);
        assert_eq!(a.remaining(), [3]);
        assert!(!a.complete());
        a.mark(3);
        assert!(a.complete());
        assert!(ChunksDone::nothing().complete());
    }
}
