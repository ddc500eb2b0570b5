//! Batches of rows, the unit that moves through tasks and exchanges, and the in-band messages
//! (data, watermarks, checkpoint barriers, end of stream) that travel with them.

use eddy_jobs::{Row, Value};

/// Whether a row adds to or retracts from results downstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A new row.
    Insert,
    /// Retracts an earlier identical row (an upsert's old version, or a delete).
    Retract,
}

/// Rows with their changelog operation, moved and routed together.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// The rows.
    pub rows: Vec<Row>,
    /// One op per row.
    pub ops: Vec<Op>,
}

impl Batch {
    /// An empty batch with room for `n` rows.
    pub fn with_capacity(n: usize) -> Batch {
        Batch { rows: Vec::with_capacity(n), ops: Vec::with_capacity(n) }
    }

    /// A batch of inserts.
    pub fn inserts(rows: Vec<Row>) -> Batch {
        let ops = vec![Op::Insert; rows.len()];
        Batch { rows, ops }
    }

    /// Appends one row.
    pub fn push(&mut self, row: Row, op: Op) {
        self.rows.push(row);
        self.ops.push(op);
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Whether row `i` is an update's old row: a retraction directly followed by an insert with the
/// same values in the `key` columns. Sinks that key their output skip it (the insert replaces
/// it); any other retraction is a delete.
pub fn is_update_old_row(rows: &[Row], ops: &[Op], i: usize, key: &[usize]) -> bool {
    let same_key = |next: &Row| key.iter().all(|&k| next.get(k) == rows[i].get(k));
    ops[i] == Op::Retract && ops.get(i + 1) == Some(&Op::Insert) && rows.get(i + 1).is_some_and(same_key)
}

/// Rough in-memory size of a row, used to bound batches by bytes.
pub fn row_bytes(row: &Row) -> usize {
    row.iter().map(|v| if let Value::String(s) = v { 24 + s.len() } else { 24 }).sum()
}

/// What flows on a channel between tasks, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Rows.
    Data(Batch),
    /// No row with an event time at or below this (Unix ms) will follow on this channel.
    Watermark(i64),
    /// The sender has finished; nothing follows.
    End,
    /// Checkpoint barrier: everything before it on this channel belongs to checkpoint `id`,
    /// everything after it to the next.
    Barrier(u64),
}
