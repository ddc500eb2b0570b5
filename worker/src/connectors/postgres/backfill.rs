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
//!    stream carries on. Rows the stream changed since the checkpoint that holds the point (none,
//!    unless this is a replay) are skipped: their latest state came with a higher version.
//!
//! A restore from a checkpoint that holds the point reads the rows from a new temporary slot's
//! snapshot, after the stream caught up with it, skipping every row it changed meanwhile. The
//! others are as they were at `C` and go out under `V` again, a repeat an upsert consumer ignores.

use serde::{Deserialize, Serialize};

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

/// Where a backfill sits in the stream: its snapshot's consistent point, and its rows' version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Point {
    pub at: u64,
    pub version: u64,
}

/// The query that checks a backfill's condition without reading a row: a mistake is said before
/// anything is created.
pub(crate) fn check_query(table: &str, filter: &str) -> String {
    format!("EXPLAIN SELECT 1 FROM {table} WHERE ({filter})")
}

/// The rows of `select` (`SELECT columns FROM table`) that the condition selects.
pub(crate) fn rows_query(select: &str, filter: &str) -> String {
    format!("{select} WHERE ({filter})")
}
