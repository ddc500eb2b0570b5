//! Backfills (`eddy backfill JOB --where …`): the rows of the table that a condition selects,
//! read again into the running stream, after an incident downstream.
//!
//! The rows must sit in every consumer's order exactly where a change made at that moment would:
//! above every version given out before, below every version given out after, and the same after
//! a crash half way. So a backfill goes in steps, each in a checkpoint before the next:
//!
//! 1. **Taken.** The order reaches the source just before a checkpoint's barrier (the coordinator
//!    sends it with every checkpoint until one that carried it completes), so that checkpoint
//!    records it; a restore from it starts the backfill again.
//! 2. **Point.** The reader checks the condition (`EXPLAIN`; a mistake fails the backfill with
//!    the server's words, never the job), creates a temporary slot that exports a snapshot at its
//!    consistent point `C`, and streams on until it reaches `C`. There every change before `C` has
//!    its version, and the backfill takes the next one, `V`; changes after `C` get versions above
//!    `V` (it becomes the last version given out). The point (`C`, `V`) goes to the source and the
//!    stream waits until a completed checkpoint holds it, since a replay must give every change
//!    after `C` a version above `V` again.
//! 3. **Rows.** The snapshot's rows that the condition selects go out under version `V`, then the
//!    stream carries on. Rows the stream changed between the order and `C` are skipped: their
//!    latest state went out just before, whole. Columns are those the table has in the
//!    backfill's snapshot (read from the catalog there).
//!
//! The condition is checked by [`eddy_jobs::condition`] (one expression over the row, nothing that
//! reads elsewhere) and read inside a read-only snapshot. A backfill whose condition PostgreSQL
//! refuses, or whose rows cannot be read for a reason of the user's, fails alone: the stream
//! carries on and the failure is said in the source's notes. Other errors (a connection lost)
//! fail the task, and the restart carries the backfill out from the checkpoint that holds it.
//! The slot's lag bound is not enforced while a backfill's rows are read (the stream waits).
//!
//! Rows re-read carry their old event times: past the watermark, event-time windows downstream
//! count them late.
//!
//! A restore from a checkpoint that holds the point reads the rows from a new temporary slot's
//! snapshot, after the stream caught up with it, skipping every row it changed meanwhile. The
//! others are as they were at `C` and go out under `V` again, a repeat an upsert consumer ignores.

use serde::{Deserialize, Serialize};

use crate::operator::TaskMetrics;

/// A backfill the source has taken and not yet handed on (checkpoints hold them, oldest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Backfill {
    /// The coordinator's id for it (ids grow: a repeat is one at or below the last taken).
    pub id: u64,
    /// The SQL condition on the table's columns.
    pub filter: String,
    /// Set once the stream reached the backfill's snapshot.
    pub point: Option<Point>,
}

/// A backfill handed on or failed, with what came of it in words (`done rows=… skipped=…`, or
/// `failed: …`). Checkpoints keep the last few: an order sent again is known, and the outcome
/// outlives a restart (the CLI waits for it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Finished {
    pub id: u64,
    pub outcome: String,
}

/// How many finished backfills a checkpoint keeps.
const FINISHED_KEPT: usize = 8;

/// The note that tells backfill `id`'s outcome.
pub(crate) fn note(id: u64) -> String {
    format!("backfill_{id}")
}

/// Backfill `id` is over: no longer `pending`, its outcome kept in `finished` (the last few) and
/// said in a note.
pub(crate) fn finish(pending: &mut Vec<Backfill>, finished: &mut Vec<Finished>, metrics: &TaskMetrics, id: u64, outcome: String) {
    pending.retain(|b| b.id != id);
    metrics.set_note(&note(id), outcome.clone());
    finished.push(Finished { id, outcome });
    let over = finished.len().saturating_sub(FINISHED_KEPT);
    finished.drain(..over);
    metrics.set_gauge("backfills_waiting", pending.len() as i64);
}

/// Where a backfill sits in the stream: its snapshot's consistent point, and its rows' version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Point {
    pub at: u64,
    pub version: u64,
}

/// The query that checks a backfill's condition (already through [`eddy_jobs::condition`])
/// against the table without reading a row: a mistake is said before anything is created.
pub(crate) fn check_query(table: &str, filter: &str) -> String {
    format!("EXPLAIN SELECT 1 FROM {table} WHERE ({filter})")
}

/// The rows of `select` (`SELECT columns FROM table`) that the condition selects.
pub(crate) fn rows_query(select: &str, filter: &str) -> String {
    format!("{select} WHERE ({filter})")
}
