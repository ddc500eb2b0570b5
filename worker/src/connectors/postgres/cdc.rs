//! The `postgres_cdc` source: a table's existing rows, then every change to it, as an upsert
//! changelog read from PostgreSQL logical replication (`pgoutput`).
//!
//! # How data flows
//!
//! `start` checks the table (it exists, has every declared column with a type that reads as the
//! declared one, and is `REPLICA IDENTITY FULL`), creates the publication if it is missing (`FOR
//! TABLE <table>`; an existing one is used as is, but must publish the table's inserts, updates and
//! deletes) and then looks for the slot:
//!
//! - **New slot.** On one replication session it runs `CREATE_REPLICATION_SLOT <slot> LOGICAL
//!   pgoutput EXPORT_SNAPSHOT`. The server answers with the slot's consistent point `C` and the name
//!   of a snapshot that sees exactly the transactions committed before `C`. A second, ordinary
//!   connection imports it (`BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT …`)
//!   while the replication session still waits, so the snapshot read by `SELECT` and the stream
//!   that starts at `C` meet with no gap and no overlap: every row committed before `C` comes from
//!   the snapshot, every change committed after it from the stream.
//! - **Existing slot, restored from a checkpoint that holds the whole snapshot.** The stream
//!   resumes at the position the checkpoint recorded (`START_REPLICATION` there: transactions that
//!   committed before it are not sent again), never silently wherever the slot is. A slot that has
//!   moved past it (an older savepoint) cannot go back, and a slot that is gone or invalidated
//!   cannot be read: each is an error that says what to do, never a silent new snapshot.
//! - **Existing slot, no completed checkpoint holds the whole snapshot** (the worker died during
//!   the snapshot, or before the first checkpoint after it). The exported snapshot died with its
//!   session. A temporary slot exports a new snapshot at its own consistent point `C2`. The kept
//!   slot's stream, from where the checkpoint stopped (`C` if none completed: nothing was
//!   confirmed), first catches up to `C2`, every change as usual, noting the keys it touched; then
//!   the chunks of the new snapshot that no checkpoint holds are read (see [`super::chunks`]),
//!   without the touched rows (their latest change came from the stream) and with every other row
//!   under version `C`: a row unchanged since `C` is what the first reading sent, under the version
//!   it sent it with, and a row that changed before the checkpoint's position already went
//!   downstream under a higher version, which an upsert consumer keeps. Downstream sees exactly the
//!   versions an undisturbed run gives, some of them twice, which an upsert consumer (and a
//!   receiver deduplicating by id and version) ignores; a row deleted meanwhile gets its delete
//!   from the stream. The keys changed while the job was down are held in memory until the snapshot
//!   is read. The slot is kept, not dropped, for exactly this.
//! - **Existing slot, new job** (no restore, attempt 1): the slot does not tell whether its job
//!   finished the snapshot, so `existing_slot` decides: `fail` (the default, naming the choices),
//!   `resume` (stream from the slot) or `reread` (as above, catching up from the slot's position).
//! - With `snapshot = false` a new slot exports nothing and only changes from `C` on are read.
//!
//! A reader task owns both connections. It reads the snapshot in chunks of pages (`ctid` ranges,
//! each with `COPY (SELECT …) TO STDOUT`; see [`super::chunks`]), counting `snapshot_rows_done`
//! against the table's estimated rows and `snapshot_chunks_done`, with the rate and the seconds
//! left (`snapshot_rows_per_second`, `snapshot_eta_seconds`); checkpoints record the chunks handed
//! on. It waits until the source has handed every snapshot batch on, then sends `START_REPLICATION`
//! on the session that created the slot and decodes the stream (a re-read streams first and reads
//! the snapshot when the stream reaches `C2`). Everything it produces goes through one bounded
//! queue (a few batches deep), so `next_batch` only receives from a channel and is cancel-safe, and
//! a slow pipeline holds the reader back (and, through TCP, the server) instead of growing memory.
//!
//! # Rows
//!
//! Columns are matched by name (case-insensitively) between the declared `columns` and the table,
//! whatever their order in the table; undeclared table columns are skipped. Both the snapshot
//! (simple-query protocol) and the stream (`pgoutput` protocol version 1, text format) deliver each
//! value as PostgreSQL's text output, and one decoder turns that text into the declared type:
//! BIGINT from `int2/int4/int8`, DOUBLE from `float4/float8/numeric` (and integers), BOOLEAN from
//! `bool`, TIMESTAMP from `timestamptz`, `timestamp` (read as UTC) and `date`, VARCHAR from any
//! type's text (`text`, `uuid`, `jsonb` as its JSON text, …). Every session pins `DateStyle=ISO`,
//! `TimeZone=UTC` and `extra_float_digits=3`, so the text is the same whatever the server's defaults.
//!
//! An insert is `Insert(new)`, an update `Retract(old)` immediately followed by `Insert(new)` in the
//! same batch, a delete `Retract(old)`: with `REPLICA IDENTITY FULL` the old row is complete, and an
//! unchanged TOASTed value in the new row is taken from it. `TRUNCATE` cannot be turned into
//! retractions (the rows are not known), so it is logged as a warning and skipped, as Debezium does
//! by default. Changes to other tables of the publication are ignored.
//!
//! # Schema changes
//!
//! pgoutput describes the table (a relation message) before its first change in a session and
//! again after its definition changed. Each description is compared with the columns known before
//! (the table's when the slot was made, or those a restored checkpoint recorded with its position;
//! after a start with neither, the first description is taken as it is). A column added or
//! dropped goes by `schema_changes`: `fail` stops the job, naming the change, when a column it
//! reads is dropped or one it does not read is added (one that `columns` declares is read from then
//! on); `evolve` reads a declared column the table lacks as NULL and skips an undeclared one, or
//! carries it with `extra_columns` (below). A
//! rename (a column gone and another come in one description) or a type change stops the job in
//! either case, named: which column became which is not guessed. A new description reaches the
//! source in stream order, so a checkpoint records the columns that go with its position.
//!
//! A job's schema is fixed at submit, so a column no stage knows cannot become a column of its
//! own. With `extra_columns` the rows carry one more VARCHAR column: a JSON object of every
//! column `columns` does not declare, as the table has them when the row is read (the snapshot's
//! query names them; a change's relation message says them; a backfill reads the catalog in its
//! snapshot), each value as a declared column of its type would write it, NULLs left out. An
//! added column joins the object with its first change, a dropped one leaves it (under `fail`,
//! dropping a carried column stops the job), and an unchanged TOASTed value is taken from the old
//! row's object. A Kafka sink with `extra_fields` spreads the object into the record, so a
//! downstream job reads the column by declaring it.
//!
//! # Versions
//!
//! The optional `version_column` carries an LSN as BIGINT. Snapshot rows carry the consistent point
//! `C`. A change carries the LSN of its WAL record, raised above `C` and above the previous
//! change's version: versions are distinct and grow in stream order, and per row that is commit
//! order (two transactions changing a row are serialised by its lock). The raise covers the
//! transactions that wrote before `C` but committed after it, whose records would otherwise sort
//! below the snapshot's `C` or share one version. Checkpoints record the last version given out
//! with their position, so a replay gives every change the version it had the first time. Both
//! rows of an update, and a delete's retraction, carry the change's version: the WAL does not say
//! which version the old row was emitted with.
//!
//! # Confirming positions
//!
//! The slot's `confirmed_flush_lsn` is the oldest position a restart can go back to (the server
//! discards WAL before it), so it only ever moves to a position whose changes have all been handed
//! on (with checkpoints: are in a completed checkpoint, see below): each batch carries the end LSN of the last
//! transaction it completes; [`Source::handed_on`] passes the highest one returned so far to the
//! reader, which reports it with `update_applied_lsn` (the library sends it as a standby status
//! update within a second). A batch that ends inside a transaction confirms nothing new: on a
//! restart PostgreSQL resends every transaction that commits after the confirmed position, whole.
//! When the stream is idle, the server's keepalives carry its current WAL end; once everything
//! before it is handed on the reader confirms that too, so a slot whose tables are quiet does not
//! hold back WAL that other tables or databases write. Nothing is confirmed before the whole
//! snapshot has been handed on. `slot_lag_bytes` (`pg_current_wal_lsn() - confirmed_flush_lsn`) is
//! refreshed from [`Source::tick`] at most once a second; `confirmed_lsn` is the last position
//! handed to the library.
//!
//! The slot is not dropped when the task stops for a restart, a rescale or a savepoint: its
//! position is the source's durable state. It is dropped when the job is cancelled for good
//! (`eddy cancel`, unless `--keep-slot`), since a slot nobody reads holds WAL on the server. Without
//! checkpoints, a slot this run created whose snapshot was not handed on completely is dropped
//! too, so the next start takes a new snapshot.
//!
//! # Event time
//!
//! With `event_time` on the source, a task writes PostgreSQL's clock into the WAL every
//! `heartbeat_interval` as a logical message, and the stream hands it back in WAL order: once it
//! arrives, every transaction committed before it has been read, so [`Source::progress`] reports
//! that time (see [`Clock`]). Messages are not passed on while a re-read's snapshot is still to
//! come, nor by sources without event time (every slot of the database sees them).
//!
//! # Parallelism
//!
//! One slot is one ordered stream, which subtask 0 reads. A new job's snapshot (first attempt, no
//! restore) is shared out: subtask 0 offers the exported snapshot and its chunk plan to the
//! others through the database ([`super::handoff`]), chunk `n` goes to subtask `n % parallelism`,
//! and each reads its share under version `C`, in parallel, on its own connection. Subtask 0
//! streams once every subtask has said (through the database again) that its share is handed on,
//! so the changes follow the snapshot as with one subtask. Sharing needs checkpoints (which
//! record each subtask's chunks) and `version_column`: rows of different subtasks reach a keyed
//! consumer through different channels, and the versions order them (a change always outranks
//! `C`); without either, subtask 0 reads every chunk itself.
//! A subtask with nothing (more) to read idles: it stays alive, takes part in checkpoints and
//! holds no watermark back. After a restart or a restore (a rescale too) subtask 0 reads the
//! chunks no checkpoint holds by itself, as above, and the others idle.
//!
//! # Why `pgwire-replication`
//!
//! tokio-postgres 0.7 reads the snapshot but has no replication (CopyBoth) mode. The
//! `pgwire-replication` crate is small, maintained and does the transport only: startup and SCRAM,
//! `START_REPLICATION`, standby status updates on its own schedule (also under backpressure and
//! when idle, so `wal_sender_timeout` never trips), and an explicit, monotonic
//! `update_applied_lsn`, which is exactly the "confirm only what was handed on" contract. Its gated
//! sessions run `CREATE_REPLICATION_SLOT … EXPORT_SNAPSHOT` on the very session that later streams,
//! which makes the exported-snapshot hand-off possible without a fallback. It forwards `pgoutput`
//! payloads raw (it parses only Begin, Commit and logical messages), so the decoder below is ours,
//! and it shares the text decoding with the snapshot path. TLS is not enabled (its `tls-rustls`
//! feature is off), so `sslmode=require` is refused.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use eddy_jobs::connectors::{ExistingSlot, PostgresCdcOptions, SchemaChanges};
use eddy_jobs::postgres::{plain_identifier, publication_lock, PUBLICATION_MARK};
use eddy_jobs::{DataType, Row, Schema, Value};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::config::Host;
use tokio_postgres::Client;
use tracing::{debug, info, warn};

use super::backfill::{self, Backfill, Finished, Point};
use super::chunks::{ChunkPlan, ChunkRows, ChunksDone, SnapshotProgress};
use super::handoff::{self, SharedSnapshot};
use super::pgoutput::{decode_pgoutput, Datum, OldTuple, PgOutput, Relation};
use super::slots::{abandon_slot, create_slot, existing_slot, import_snapshot};
use super::text::{copy_fields, decode_value};
use super::{check_identifier, client_config, connect, pg_error, quote_ident, wire_error, SESSION_OPTIONS};
use crate::batch::{Batch, Op};
use crate::error::{Blame, Result, TaskError};
use crate::operator::{
    ConnectorContext, InlineState, OperatorSnapshot, PendingCheckpoints, Progress, RestoredState, Source, SourceOrder, Stage, TaskMetrics,
    BATCH_BYTES,
};

/// Rows per batch (an update's two rows are never split, so a batch may hold one more).
const BATCH_ROWS: usize = 1024;
/// Chunks queued between the reader task and `next_batch`.
const QUEUED_CHUNKS: usize = 4;
/// Replication events the library buffers before it stops reading the socket.
const REPLICATION_EVENTS: usize = 4096;
/// How soon a confirmed position reaches the server.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// How often `slot_lag_bytes` is refreshed at most.
const LAG_EVERY: Duration = Duration::from_secs(1);
/// How long the slot's lag may stay past `max_slot_lag_bytes` before the source fails.
const LAG_GRACE: Duration = Duration::from_secs(5);

/// Reads a table's snapshot, then its changes.
pub struct PostgresCdc {
    /// Chunks from the reader task; `None` on a subtask that reads nothing.
    chunks: Option<mpsc::Receiver<Result<Chunk>>>,
    /// The position the reader may report to the slot.
    confirm: watch::Sender<Lsn>,
    /// Told once every snapshot batch has been handed on (the reader waits for it to stream).
    snapshot_handed_on: Option<oneshot::Sender<()>>,
    /// The snapshot's last batch has been returned.
    snapshot_returned: bool,
    /// Highest position whose changes are all in batches returned so far.
    returned: Lsn,
    /// The last version given to a change at `returned` (see `Changes::last`).
    returned_version: u64,
    /// Highest position passed to `confirm`.
    confirmed: Lsn,
    metrics: Arc<TaskMetrics>,
    lag: Option<LagProbe>,
    /// Positions are confirmed when checkpoints complete, not when batches are handed on.
    checkpointing: bool,
    /// Every snapshot row has been returned (or there was no snapshot to read).
    snapshot_done: bool,
    /// Positions of checkpoints taken and not complete yet.
    pending: PendingCheckpoints<Lsn>,
    /// The version floor of changes (see `Changes::floor`).
    floor: Lsn,
    /// The snapshot's chunk plan and the chunks handed on (`None`: a subtask other than 0 that has
    /// no share yet).
    parts: Option<ChunksDone>,
    /// The table's columns as the stream last described them (see `Changes::known`).
    columns: Option<Vec<(String, u32)>>,
    /// This subtask streams the slot (subtask 0); the others read a share of a new job's
    /// snapshot, if any, then idle.
    streams: bool,
    /// The slot and publication, released when the task ends after the job was cancelled for good.
    release: Option<Release>,
    /// With event time: the task writing clock messages into the WAL (see [`Clock`]).
    clock_writer: Option<JoinHandle<()>>,
    /// The latest clock read back from the stream.
    clock: Option<i64>,
    /// Backfills taken and not handed on yet, oldest first (see [`super::backfill`]).
    backfills: Vec<Backfill>,
    /// The last few backfills handed on or failed (an order for one of them is a repeat).
    finished: Vec<Finished>,
    /// Backfills for the reader to carry out (subtask 0).
    backfill_orders: Option<mpsc::UnboundedSender<Backfill>>,
    /// A backfill's point waiting to be held by a completed checkpoint: the first checkpoint
    /// that recorded it (once one did), and the reader's signal.
    point_held: Option<(Option<u64>, oneshot::Sender<()>)>,
}

/// What a checkpoint records of the source (a versioned [`InlineState`]): the position every
/// change up to which was handed on, the slot's version floor and the last version given out at
/// that position (subtask 0, which streams; `lsn` 0 on the others), and the snapshot's chunk plan
/// with the chunks this subtask handed on. On a restore subtask 0 takes the union of every
/// subtask's chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Position {
    #[serde(with = "lsn")]
    lsn: Lsn,
    #[serde(with = "lsn")]
    floor: Lsn,
    version: u64,
    chunks: ChunksDone,
    /// The table's columns (name, type OID) as the stream had last described them at `lsn`
    /// (`None`: not known, the next description is taken as it is).
    columns: Option<Vec<(String, u32)>>,
    /// Backfills taken and not handed on at `lsn`, oldest first.
    backfills: Vec<Backfill>,
    /// The last few backfills handed on or failed.
    finished: Vec<Finished>,
}

impl InlineState for Position {
    const HOLDER: &'static str = "postgres_cdc";
    const VERSION: u8 = 3;
}

/// The layout before backfills: as [`Position`] without them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PositionV2 {
    #[serde(with = "lsn")]
    lsn: Lsn,
    #[serde(with = "lsn")]
    floor: Lsn,
    version: u64,
    chunks: ChunksDone,
    columns: Option<Vec<(String, u32)>>,
}

impl InlineState for PositionV2 {
    const HOLDER: &'static str = "postgres_cdc";
    const VERSION: u8 = 2;
}

impl From<PositionV2> for Position {
    fn from(p: PositionV2) -> Position {
        let PositionV2 { lsn, floor, version, chunks, columns } = p;
        Position { lsn, floor, version, chunks, columns, backfills: Vec::new(), finished: Vec::new() }
    }
}

/// The layout before chunks: whether the (whole) snapshot had been handed on, then as
/// [`Position`]. Checkpoints from before versioned state hold them as a byte and little-endian
/// words; those written before the last field existed hold 17 bytes, and their last version is
/// taken as the position, which no later change is below. Some hold a fifth word, from an earlier
/// way of re-reading: the position of a snapshot whose rows carry it as their version, so once
/// that snapshot is handed on, later changes must outrank it (it raises the floor); before, the
/// table is read again anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct PositionV1 {
    snapshot_done: bool,
    #[serde(with = "lsn")]
    lsn: Lsn,
    #[serde(with = "lsn")]
    floor: Lsn,
    version: u64,
}

impl InlineState for PositionV1 {
    const HOLDER: &'static str = "postgres_cdc";
    const VERSION: u8 = 1;
}

impl From<PositionV1> for Position {
    fn from(p: PositionV1) -> Position {
        let done = if p.snapshot_done { vec![0] } else { Vec::new() };
        let chunks = ChunksDone { plan: ChunkPlan::whole(), done };
        PositionV2 { lsn: p.lsn, floor: p.floor, version: p.version, chunks, columns: None }.into()
    }
}

/// An LSN in checkpoint state: its number.
mod lsn {
    use pgwire_replication::Lsn;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(lsn: &Lsn, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(lsn.0)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        u64::deserialize(d).map(Lsn)
    }
}

impl Position {
    /// The position a restored subtask's state holds, in any layout (`None`: it read nothing).
    fn restored(state: &RestoredState) -> Result<Option<Position>> {
        if let Ok(Some(old)) = state.state::<PositionV1>() {
            return Ok(Some(old.into()));
        }
        if let Ok(Some(old)) = state.state::<PositionV2>() {
            return Ok(Some(old.into()));
        }
        state.read(|old| Ok(Position::unversioned(old).map(Position::from)))
    }

    fn unversioned(bytes: &[u8]) -> Option<PositionV1> {
        let word = |at: usize| bytes.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
        let snapshot_done = *bytes.first()? == 1;
        let (lsn, mut floor) = (word(1)?, word(9)?);
        if snapshot_done {
            floor = floor.max(word(25).unwrap_or(0));
        }
        Some(PositionV1 { snapshot_done, lsn: Lsn(lsn), floor: Lsn(floor), version: word(17).unwrap_or(lsn.max(floor)) })
    }

    /// What a restore hands back, as one position: the stream's (the subtask that streamed) with
    /// the chunks every subtask handed on.
    fn gather(restore: &Option<(u64, Vec<RestoredState>)>) -> Result<Option<(u64, Position)>> {
        let Some((id, states)) = restore else { return Ok(None) };
        let mut positions = Vec::new();
        for state in states {
            positions.extend(Position::restored(state)?);
        }
        let Some(mut stream) = positions.iter().filter(|p| p.lsn.0 != 0).max_by_key(|p| p.lsn).cloned() else { return Ok(None) };
        for p in &positions {
            stream.chunks.merge(&p.chunks);
        }
        Ok(Some((*id, stream)))
    }
}

/// Where a run begins, decided from the slot and the checkpoint restored (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Begin {
    /// Create the slot; read the snapshot it exports (unless `snapshot = false`), then stream.
    Fresh,
    /// The slot exists but no completed checkpoint holds the whole snapshot: stream from `from`
    /// (the slot's consistent point, or where a checkpoint stopped) up to a temporary slot's
    /// point, then read that slot's snapshot: the chunks `chunks` lacks (all of them if `None`),
    /// every row under version `floor`.
    Reread { from: Lsn, floor: Lsn, version: u64, chunks: Option<ChunksDone> },
    /// Stream from `from`, giving versions above `version` (and above `floor`).
    Stream { from: Lsn, floor: Lsn, version: u64, chunks: ChunksDone },
}

impl Begin {
    fn decide(o: &PostgresCdcOptions, ctx: &ConnectorContext, slot: Option<Lsn>, restored: Option<(u64, Position)>) -> Result<Begin> {
        let name = &o.slot;
        let reread_or_stream = |from: Lsn| {
            if o.snapshot {
                Begin::Reread { from, floor: from, version: from.0, chunks: None }
            } else {
                Begin::stream(from)
            }
        };
        Ok(match (slot, restored) {
            (None, None) => Begin::Fresh,
            (None, Some((id, p))) => {
                return Err(TaskError::user(format!(
                    "postgres_cdc: replication slot `{name}` is gone, but checkpoint {id} read from it up to {}: \
                     the changes since cannot be read again. Cancel the job and submit it again without a \
                     savepoint to take a new snapshot",
                    p.lsn
                )))
            }
            (Some(at), Some((id, p))) if at > p.lsn && p.chunks.complete() => {
                return Err(TaskError::user(format!(
                    "postgres_cdc: replication slot `{name}` is at {at}, past {} where checkpoint {id} \
                     stopped (an older savepoint?): the changes between cannot be read again. Restore from \
                     the job's latest checkpoint or savepoint, or drop the slot and submit without one",
                    p.lsn
                )));
            }
            (Some(at), Some((id, p))) if at > p.lsn => {
                return Err(TaskError::user(format!(
                    "postgres_cdc: replication slot `{name}` is at {at}, past {} where checkpoint {id} stopped, taken \
                     during the snapshot of a slot created at {}: an older savepoint cannot go back (restore the job's \
                     latest checkpoint or savepoint), and if the slot was dropped and created again, cancel the job and \
                     submit it again without a savepoint",
                    p.lsn, p.floor
                )));
            }
            (Some(_), Some((_, p))) if p.chunks.complete() => {
                Begin::Stream { from: p.lsn, floor: p.floor, version: p.version, chunks: p.chunks }
            }
            // Chunks of the snapshot were not handed on: read them again, from a new snapshot,
            // after the stream caught up with it.
            (Some(_), Some((_, p))) => Begin::Reread { from: p.lsn, floor: p.floor, version: p.version, chunks: Some(p.chunks) },
            // A restart before any checkpoint completed: nothing was confirmed, so the slot is still
            // at its consistent point, whether or not the snapshot had been read.
            (Some(at), None) if ctx.checkpointing && ctx.attempt > 1 => reread_or_stream(at),
            // Without checkpoints, a slot is confirmed as batches are handed on.
            (Some(at), None) if ctx.attempt > 1 => Begin::stream(at),
            (Some(at), None) => match o.existing_slot {
                ExistingSlot::Resume => Begin::stream(at),
                ExistingSlot::Reread => reread_or_stream(at),
                ExistingSlot::Fail => {
                    return Err(TaskError::user(format!(
                        "postgres_cdc: replication slot `{name}` already exists (at {at}), left by an earlier job; \
                         whether that job finished its snapshot is unknown. Set options.existing_slot = \"resume\" \
                         to stream from it without a snapshot, or \"reread\" to read the table again first (safe \
                         in every case), or drop it: SELECT pg_drop_replication_slot('{name}')"
                    )))
                }
            },
        })
    }

    /// Streaming from the slot's position `at`, with no snapshot to read.
    fn stream(at: Lsn) -> Begin {
        Begin::Stream { from: at, floor: at, version: at.0, chunks: ChunksDone::nothing() }
    }

    /// Where the replication stream starts (`0`: at the slot's position).
    fn from(&self) -> Lsn {
        match self {
            Begin::Fresh => Lsn(0),
            Begin::Reread { from, .. } | Begin::Stream { from, .. } => *from,
        }
    }
}

/// Whether this run shares a new job's snapshot out between its subtasks: a first attempt, not
/// restored, at parallelism above 1, with a snapshot, checkpoints (which record each subtask's
/// chunks) and a version column (rows of several subtasks reach downstream through different
/// channels, and the versions order them). Restarts and restores leave what is left to subtask 0;
/// otherwise subtask 0 reads every chunk and the others idle.
fn shares_snapshot(o: &PostgresCdcOptions, ctx: &ConnectorContext) -> bool {
    ctx.parallelism > 1 && ctx.attempt <= 1 && ctx.restore.is_none() && o.snapshot && ctx.checkpointing && o.version_column.is_some()
}

/// What the reader task hands to `next_batch`, in order.
#[derive(Debug)]
enum Chunk {
    /// Rows; once handed on, every change up to `confirm` has been (with the last version given
    /// out by then).
    Rows { batch: Batch, confirm: Option<(Lsn, u64)> },
    /// No rows, but everything up to this position has been read (a transaction that touched none
    /// of the table, or an idle stream's keepalive).
    Progress(Lsn, u64),
    /// The plan of the snapshot a subtask other than 0 reads a share of, and its point.
    Plan(ChunkPlan, Lsn),
    /// The rows of this chunk of the snapshot came before this.
    Read(u32),
    /// The stream described the table's columns anew (a column added or dropped) in the
    /// transaction whose end came before this.
    Schema(Vec<(String, u32)>),
    /// The snapshot's last rows (this subtask's share) came before this.
    SnapshotEnd,
    /// A clock message (see [`Clock`]): every transaction that committed before this time (Unix
    /// ms, the server's clock) came before.
    Clock(i64),
    /// Backfill `id` reached its point: every change before it came before this, every later
    /// one gets a higher version. `held` is told once a completed checkpoint records it; its
    /// rows follow then.
    BackfillPoint { id: u64, point: Point, held: oneshot::Sender<()> },
    /// Backfill `id`'s rows came before this (`rows` of them; `skipped` more were changed by
    /// the stream meanwhile and not sent).
    BackfillEnd { id: u64, rows: i64, skipped: usize },
    /// Backfill `id` cannot be read, for this reason; the stream carries on.
    BackfillFailed { id: u64, why: String },
}

impl PostgresCdc {
    /// Connects, creates the slot and publication if missing, and starts the snapshot.
    pub async fn start(o: &PostgresCdcOptions, ctx: ConnectorContext) -> Result<PostgresCdc> {
        let (confirm, _) = watch::channel(Lsn(0));
        let mut source = PostgresCdc {
            chunks: None,
            confirm,
            snapshot_handed_on: None,
            snapshot_returned: false,
            returned: Lsn(0),
            returned_version: 0,
            confirmed: Lsn(0),
            metrics: ctx.metrics.clone(),
            lag: None,
            checkpointing: ctx.checkpointing,
            snapshot_done: false,
            pending: PendingCheckpoints::default(),
            floor: Lsn(0),
            parts: None,
            columns: None,
            streams: ctx.task.subtask == 0,
            release: None,
            clock_writer: None,
            clock: None,
            backfills: Vec::new(),
            finished: Vec::new(),
            backfill_orders: None,
            point_held: None,
        };
        check_identifier("options.slot", &o.slot)?;
        check_identifier("options.publication", &o.publication)?;
        let declared = declared_columns(o, &ctx.schema)?;
        let pg = client_config(&o.url)?;
        let sharing = shares_snapshot(o, &ctx);
        if ctx.task.subtask != 0 && !sharing {
            info!(job_id = %ctx.job_id, task = %ctx.task, "postgres_cdc: one replication slot is one stream, read by subtask 0; this subtask idles");
            return Ok(source);
        }
        let control = Arc::new(connect(&pg, "the control connection").await?);
        let evolve = o.schema_changes == SchemaChanges::Evolve;
        let table = Table::resolve(&control, &o.table, declared, (o.extra_columns.clone(), o.version_column.is_some()), evolve).await?;
        if ctx.task.subtask != 0 {
            let (out, rx) = mpsc::channel(QUEUED_CHUNKS);
            let (ack_tx, ack_rx) = oneshot::channel();
            let share = ShareReader {
                handed_on: ack_rx,
                pg,
                job_id: ctx.job_id.clone(),
                slot: o.slot.clone(),
                subtask: ctx.task.subtask,
                parallelism: ctx.parallelism,
                table,
                metrics: source.metrics.clone(),
                out,
            };
            tokio::spawn(share.run());
            source.chunks = Some(rx);
            source.snapshot_handed_on = Some(ack_tx);
            return Ok(source);
        }
        ensure_publication(&control, &o.publication, &table, &o.slot).await?;
        let existing = existing_slot(&control, &o.slot).await?;
        let restored = Position::gather(&ctx.restore)?;
        let restored_columns = restored.as_ref().and_then(|(_, p)| p.columns.clone());
        if let Some((_, p)) = &restored {
            source.backfills = p.backfills.clone();
            source.finished = p.finished.clone();
            for f in &source.finished {
                source.metrics.set_note(&backfill::note(f.id), f.outcome.clone());
            }
        }
        let begin = Begin::decide(o, &ctx, existing, restored)?;
        // The columns the stream is compared with: the table's now for a new slot, the
        // checkpoint's on a restore; otherwise the stream's first description is taken as it is.
        let known = if begin == Begin::Fresh { Some(table.all.clone()) } else { restored_columns };
        // With event time, one clock message now, so that a user who may not write one hears it
        // at once, not as a watermark that never moves.
        if ctx.event_time.is_some() {
            Clock::write(&control).await.map_err(|e| TaskError::user(e.message))?;
        }
        let clock_every = ctx.event_time.is_some().then_some(o.heartbeat_interval);

        let mut repl = ReplicationClient::connect_gated(replication_config(&pg, o, &ctx)?.with_start_lsn(begin.from()))
            .await
            .map_err(|e| wire_error("opening the replication session", e))?;
        // A temporary slot's session (a re-read) stays open until its snapshot is read.
        let mut reread_at = Lsn(0);
        let mut exporter = None;
        // What subtask 0 offers the others (sharing a new job's snapshot).
        let mut offer = None;
        let (start, floor, version, snapshot, parts) = match begin {
            Begin::Stream { from, floor, version, chunks } => {
                info!(job_id = %ctx.job_id, slot = %o.slot, lsn = %from, "postgres_cdc: resuming the stream without a snapshot");
                (from, floor, version, None, chunks)
            }
            Begin::Reread { from, floor, version, chunks } => {
                // The snapshot exported with the slot died with its session. A temporary slot
                // exports a new one at its own consistent point `C2`; the slot's stream from
                // `from` catches up to `C2`, then the rows of that snapshot's unread chunks it
                // did not touch follow under version `floor`, as the first reading sent them.
                let (at, temp, client) = temporary_snapshot(&replication_config(&pg, o, &ctx)?, &pg, &control, &source.metrics).await?;
                let plan = ChunkPlan::make(&client, table.oid, o.snapshot_chunk_pages).await?;
                let parts = match chunks {
                    Some(c) if c.plan.relfilenode == 0 || c.plan.relfilenode == plan.relfilenode => c,
                    Some(_) => {
                        warn!(job_id = %ctx.job_id, table = %table.qualified, "postgres_cdc: the table was rewritten since its snapshot began (VACUUM FULL, CLUSTER, ALTER TABLE); reading every chunk again");
                        ChunksDone { plan, done: Vec::new() }
                    }
                    None => ChunksDone { plan, done: Vec::new() },
                };
                warn!(job_id = %ctx.job_id, slot = %o.slot, from = %from, snapshot = %at, chunks = parts.remaining().len(), of = parts.plan.total, "postgres_cdc: no completed checkpoint holds the whole snapshot; catching up from the slot, then reading the chunks not handed on again");
                exporter = Some(temp);
                reread_at = at;
                let todo = parts.remaining();
                (from, floor, version, Some((client, todo)), parts)
            }
            Begin::Fresh => {
                let (consistent, exported) = create_slot(&mut repl, &control, &source.metrics, &o.slot, false, o.snapshot).await?;
                info!(job_id = %ctx.job_id, slot = %o.slot, lsn = %consistent, snapshot = o.snapshot, "postgres_cdc: created the replication slot");
                match exported {
                    None => (consistent, consistent, consistent.0, None, ChunksDone::nothing()),
                    Some(name) => {
                        // Until the reader owns the slot (no await after this), a failed or
                        // cancelled start drops it again: its snapshot would never be read.
                        let mut guard = NewSlot { control: control.clone(), slot: o.slot.clone(), armed: true };
                        let imported = async {
                            let client = import_snapshot(&pg, &name).await?;
                            let plan = ChunkPlan::make(&client, table.oid, o.snapshot_chunk_pages).await?;
                            Ok::<_, TaskError>((client, plan))
                        };
                        let (client, plan) = match imported.await {
                            Ok(imported) => imported,
                            Err(e) => {
                                drop(repl);
                                abandon_slot(&control, &o.slot, "its snapshot could not be imported").await;
                                guard.armed = false;
                                return Err(e);
                            }
                        };
                        guard.armed = false;
                        let todo = if sharing { plan.share(0, ctx.parallelism) } else { (0..plan.total).collect() };
                        if sharing {
                            offer = Some(Some(SharedSnapshot { name, at: consistent.0, plan }));
                        }
                        (consistent, consistent, consistent.0, Some((client, todo)), ChunksDone { plan, done: Vec::new() })
                    }
                }
            }
        };
        if sharing && offer.is_none() {
            offer = Some(None); // the others hear that there is nothing for them to read
        }
        source.metrics.set_gauge("confirmed_lsn", start.0 as i64);
        source.snapshot_done = snapshot.is_none();
        source.returned = start;
        source.returned_version = version;
        source.floor = floor;
        if snapshot.is_none() {
            source.metrics.set_gauge("snapshot_rows_total", 0);
            source.metrics.set_gauge("snapshot_rows_done", 0);
        }
        let plan = parts.plan;
        source.parts = Some(parts);
        source.columns = known.clone();

        let (tx, rx) = mpsc::channel(QUEUED_CHUNKS);
        let (ack_tx, ack_rx) = oneshot::channel();
        let (orders, backfills) = mpsc::unbounded_channel();
        let replication = replication_config(&pg, o, &ctx)?;
        let mut reader = Reader {
            out: tx,
            confirm: source.confirm.subscribe(),
            changes: Changes {
                key: o.primary_key.iter().filter_map(|k| table.columns.iter().position(|(n, _)| n.eq_ignore_ascii_case(k))).collect(),
                table,
                relation: None,
                extras: Vec::new(),
                known,
                described: false,
                policy: o.schema_changes,
                start,
                floor,
                last: version,
                reread_at,
                touched: HashSet::new(),
            },
            metrics: source.metrics.clone(),
            control: control.clone(),
            slot: o.slot.clone(),
            job_id: ctx.job_id.clone(),
            release_on_failure: !ctx.checkpointing,
            snapshot_pending: snapshot.is_some(),
            clocked: clock_every.is_some(),
            offer: offer.map(|offer| (pg.clone(), ctx.parallelism, offer)),
            snapshot: snapshot.map(|(client, todo)| SnapshotRead {
                client,
                exporter,
                what: Reading::Chunks { plan, todo, handed_on: ack_rx },
            }),
            backfills,
            waiting_backfill: None,
            pg: pg.clone(),
            replication,
        };
        for b in &source.backfills {
            match b.point {
                // Its point is in the checkpoint restored: its rows are read from a new snapshot
                // once the stream caught up with it, under the version the point gave them.
                Some(_) if reader.snapshot.is_none() => {
                    let (at, temp, client) = temporary_snapshot(&reader.replication, &pg, &control, &source.metrics).await?;
                    info!(job_id = %ctx.job_id, backfill = b.id, snapshot = %at, "postgres_cdc: a backfill's rows were not all handed on; catching up from the checkpoint, then reading them again");
                    reader.changes.reread_at = at;
                    reader.snapshot = Some(SnapshotRead { client, exporter: Some(temp), what: Reading::Backfill(b.clone()) });
                }
                Some(_) => {
                    return Err(TaskError::internal(
                        "postgres_cdc: the checkpoint holds a backfill's point and chunks of the snapshot still to read",
                    ))
                }
                None => _ = orders.send(b.clone()),
            }
        }
        source.backfill_orders = Some(orders);
        source.clock_writer = clock_every.map(|every| Clock::spawn(control.clone(), every, reader.out.clone()));
        tokio::spawn(reader.run(repl));
        source.metrics.set_gauge("backfills_waiting", source.backfills.len() as i64);
        source.chunks = Some(rx);
        source.snapshot_handed_on = Some(ack_tx);
        source.release = Some(Release {
            control: control.clone(),
            slot: o.slot.clone(),
            publication: o.publication.clone(),
            released: ctx.released.clone(),
        });
        source.lag = Some(LagProbe {
            client: control,
            slot: o.slot.clone(),
            metrics: source.metrics.clone(),
            last: None,
            running: None,
            bound: o.max_slot_lag_bytes,
            warned: false,
            over_since: None,
        });
        Ok(source)
    }

    /// Lets the reader report `lsn` to the slot (positions only move forward).
    fn confirm_up_to(&mut self, lsn: Lsn) {
        if lsn > self.confirmed {
            self.confirmed = lsn;
            // The reader may have ended; its error comes through `next_batch`.
            let _ = self.confirm.send(self.confirmed);
            self.metrics.set_gauge("confirmed_lsn", self.confirmed.0 as i64);
        }
    }
}

/// What a cancel for good releases upstream: the slot, and the publication if Eddy created it
/// and no other job uses it (see [`release_publication`]).
struct Release {
    control: Arc<Client>,
    slot: String,
    publication: String,
    /// Set when the job ends for good.
    released: Arc<AtomicBool>,
}

/// A slot created by this run that no reader owns yet: if `start` is cancelled meanwhile, the
/// slot is dropped in the background, since its snapshot will never be read.
struct NewSlot {
    control: Arc<Client>,
    slot: String,
    armed: bool,
}

impl Drop for NewSlot {
    fn drop(&mut self) {
        if self.armed {
            abandon_in_background(self.control.clone(), std::mem::take(&mut self.slot), "its snapshot was never read", None);
        }
    }
}

/// Drops the slot from a `drop`, which cannot wait for it; once it is gone, releases
/// `publication` too, if given (see [`release_publication`]).
fn abandon_in_background(control: Arc<Client>, slot: String, why: &'static str, publication: Option<String>) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            let gone = abandon_slot(&control, &slot, why).await;
            if let Some(publication) = publication.filter(|_| gone) {
                release_publication(&control, &publication, &slot).await;
            }
        });
    }
}

#[async_trait]
impl Stage for PostgresCdc {
    async fn snapshot(&mut self, id: u64, _scratch: &std::path::Path) -> Result<OperatorSnapshot> {
        let Some(chunks) = self.parts.clone() else {
            return Ok(OperatorSnapshot::default()); // a subtask that read nothing
        };
        if !self.streams {
            let position =
                Position { lsn: Lsn(0), floor: self.floor, version: 0, chunks, columns: None, backfills: Vec::new(), finished: Vec::new() };
            return Ok(OperatorSnapshot::state(&position));
        }
        self.pending.taken(id, self.returned);
        if let Some((recorded @ None, _)) = &mut self.point_held {
            *recorded = Some(id);
        }
        let position = Position {
            lsn: self.returned,
            floor: self.floor,
            version: self.returned_version,
            chunks,
            columns: self.columns.clone(),
            backfills: self.backfills.clone(),
            finished: self.finished.clone(),
        };
        Ok(OperatorSnapshot::state(&position))
    }

    async fn checkpoint_complete(&mut self, id: u64) -> Result<()> {
        if self.point_held.as_ref().is_some_and(|(recorded, _)| recorded.is_some_and(|r| r <= id)) {
            if let Some((_, held)) = self.point_held.take() {
                let _ = held.send(());
            }
        }
        let Some(lsn) = self.pending.complete(id) else { return Ok(()) };
        self.confirm_up_to(lsn);
        Ok(())
    }

    async fn tick(&mut self) -> Result<()> {
        self.check_lag()
    }
}

#[async_trait]
impl Source for PostgresCdc {
    async fn next_batch(&mut self) -> Result<Option<Batch>> {
        // Here too: a source that never waits for data may see no tick for a long while.
        self.check_lag()?;
        // A subtask with nothing (more) to read idles: alive, holding no watermark back.
        let Some(chunks) = self.chunks.as_mut() else { return std::future::pending().await };
        // Only `recv` awaits, and each chunk is fully taken in before the next await: cancel-safe.
        loop {
            match chunks.recv().await {
                Some(Ok(Chunk::Rows { batch, confirm })) => {
                    advance(&mut self.returned, &mut self.returned_version, confirm);
                    return Ok(Some(batch));
                }
                Some(Ok(Chunk::Progress(lsn, version))) => advance(&mut self.returned, &mut self.returned_version, Some((lsn, version))),
                Some(Ok(Chunk::Plan(plan, at))) => {
                    self.parts = Some(ChunksDone { plan, done: Vec::new() });
                    self.floor = at;
                }
                Some(Ok(Chunk::Schema(columns))) => self.columns = Some(columns),
                // (A backfill's rows come as one chunk too, after the snapshot.)
                Some(Ok(Chunk::Read(n))) => {
                    if let Some(parts) = self.parts.as_mut().filter(|_| !self.snapshot_done) {
                        parts.mark(n);
                    }
                }
                Some(Ok(Chunk::BackfillPoint { id, point, held })) => {
                    advance(&mut self.returned, &mut self.returned_version, Some((Lsn(point.at), point.version)));
                    if let Some(b) = self.backfills.iter_mut().find(|b| b.id == id) {
                        b.point = Some(point);
                    }
                    self.point_held = Some((None, held));
                }
                Some(Ok(Chunk::BackfillEnd { id, rows, skipped })) => {
                    info!(backfill = id, rows, skipped, "postgres_cdc: backfill handed on");
                    self.metrics.set_gauge("backfill_rows", rows);
                    self.metrics.set_gauge("backfill_rows_skipped", skipped as i64);
                    self.metrics.set_gauge("backfill_done_id", id as i64);
                    backfill::finish(
                        &mut self.backfills,
                        &mut self.finished,
                        &self.metrics,
                        id,
                        format!("done rows={rows} skipped={skipped}"),
                    );
                }
                Some(Ok(Chunk::BackfillFailed { id, why })) => {
                    warn!(backfill = id, %why, "postgres_cdc: backfill failed; the stream carries on");
                    self.metrics.set_gauge("backfill_failed_id", id as i64);
                    backfill::finish(&mut self.backfills, &mut self.finished, &self.metrics, id, format!("failed: {why}"));
                }
                Some(Ok(Chunk::SnapshotEnd)) => {
                    self.snapshot_returned = true;
                    self.snapshot_done = true;
                    if !self.streams {
                        info!(
                            rows = self.metrics.gauges().get("snapshot_rows_done").copied().unwrap_or(0),
                            "postgres_cdc: this subtask's share of the snapshot is read; it idles"
                        );
                        self.chunks = None;
                        return std::future::pending().await;
                    }
                }
                Some(Ok(Chunk::Clock(t))) => {
                    self.clock = Some(self.clock.map_or(t, |c| c.max(t)));
                    // Returned at once, so that the task hears of it.
                    return Ok(Some(Batch::default()));
                }
                Some(Err(e)) => return Err(e),
                None => return Err(TaskError::internal("postgres_cdc: the replication reader ended without an error")),
            }
        }
    }

    async fn order(&mut self, order: SourceOrder) -> Result<()> {
        let SourceOrder::Backfill { id, filter } = order;
        // Subtask 0 streams, and reads backfills into the stream; a repeat is one it has.
        let repeat = self.backfills.iter().any(|b| b.id == id) || self.finished.iter().any(|f| f.id == id);
        let Some(orders) = self.backfill_orders.as_ref().filter(|_| !repeat) else { return Ok(()) };
        let filter = match eddy_jobs::condition::postgres_condition(&filter) {
            Ok(filter) => filter,
            Err(why) => {
                backfill::finish(&mut self.backfills, &mut self.finished, &self.metrics, id, format!("failed: {why}"));
                return Ok(());
            }
        };
        info!(backfill = id, %filter, "postgres_cdc: backfill taken; the checkpoint about to be taken holds it");
        let backfill = Backfill { id, filter, point: None };
        let _ = orders.send(backfill.clone());
        self.backfills.push(backfill);
        self.metrics.set_gauge("backfill_id", id as i64);
        self.metrics.set_gauge("backfills_waiting", self.backfills.len() as i64);
        Ok(())
    }

    async fn handed_on(&mut self) -> Result<()> {
        if let Some(ack) = self.snapshot_handed_on.take_if(|_| self.snapshot_returned) {
            let _ = ack.send(());
        }
        if !self.checkpointing {
            self.confirm_up_to(self.returned);
        }
        Ok(())
    }

    fn progress(&self) -> Progress {
        if !self.streams {
            // Snapshot rows hold the watermark back while they are read. Then the subtask sends
            // nothing more, so its watermark follows the wall clock: it holds nothing back, and a
            // sink writing heartbeats behind it keeps writing them (a watermark at the end of time
            // would not be written, and would hold its readers back).
            return if self.chunks.is_none() || self.snapshot_done {
                Progress::Watermark(eddy_jobs::time::now_ms())
            } else {
                Progress::Waiting
            };
        }
        match (&self.chunks, &self.clock_writer) {
            (None, _) => Progress::Idle,
            (Some(_), None) => Progress::Unknown,
            (Some(_), Some(_)) => self.clock.map_or(Progress::Waiting, Progress::Clock),
        }
    }
}

/// Every change up to `lsn` has been returned (if `at` holds it), the last with version `version` at most.
fn advance(returned: &mut Lsn, returned_version: &mut u64, at: Option<(Lsn, u64)>) {
    if let Some((lsn, version)) = at.filter(|(lsn, _)| *lsn >= *returned) {
        *returned = lsn;
        *returned_version = (*returned_version).max(version);
    }
}

impl PostgresCdc {
    /// Refreshes the slot's lag, and holds it to `max_slot_lag_bytes` once the snapshot has been
    /// handed on (until then the slot cannot move).
    fn check_lag(&mut self) -> Result<()> {
        // Not while a backfill's rows are read: the stream waits for them.
        let settled = self.snapshot_done && self.snapshot_handed_on.is_none() && self.backfills.iter().all(|b| b.point.is_none());
        let Some(lag) = self.lag.as_mut() else { return Ok(()) };
        lag.poll();
        if settled {
            lag.check_bound()?;
        }
        Ok(())
    }
}

impl Drop for PostgresCdc {
    fn drop(&mut self) {
        // The reader notices the closed channel by itself and ends its session (dropping a slot
        // whose snapshot was not handed on); only the lag query is cut short.
        for handle in self.lag.as_mut().and_then(|l| l.running.take()).into_iter().chain(self.clock_writer.take()) {
            handle.abort();
        }
        // The job was cancelled for good: the slot would only hold WAL back on the server.
        if let Some(Release { control, slot, publication, .. }) = self.release.take().filter(|r| r.released.load(Ordering::SeqCst)) {
            abandon_in_background(control, slot, "the job was cancelled", Some(publication));
        }
    }
}

/// Refreshes `slot_lag_bytes` in the background, at most once per [`LAG_EVERY`].
struct LagProbe {
    client: Arc<Client>,
    slot: String,
    metrics: Arc<TaskMetrics>,
    last: Option<Instant>,
    running: Option<JoinHandle<()>>,
    /// `max_slot_lag_bytes`, whether the warning before it was logged, and since when the lag
    /// has been past it.
    bound: Option<u64>,
    warned: bool,
    over_since: Option<Instant>,
}

impl LagProbe {
    /// Fails once the slot has held back more WAL than the bound allows for [`LAG_GRACE`] (a
    /// burst of writes elsewhere on the server passes); warns at 80 % of it.
    fn check_bound(&mut self) -> Result<()> {
        let (Some(bound), Some(lag)) = (self.bound, self.metrics.gauge("slot_lag_bytes")) else { return Ok(()) };
        let lag = lag.max(0) as u64;
        if lag <= bound {
            self.over_since = None;
        } else if self.over_since.get_or_insert_with(Instant::now).elapsed() >= LAG_GRACE {
            return Err(TaskError::user(format!(
                "postgres_cdc: replication slot `{}` holds {lag} bytes of WAL back on the server, past max_slot_lag_bytes = {bound}: \
                 the job is not confirming what it reads (is it checkpointing? is it keeping up?). The slot is kept, so that \
                 a restart loses nothing: fix the cause and resubmit, raise the bound, or cancel the job to drop the slot",
                self.slot
            )));
        }
        if lag > bound / 5 * 4 && !self.warned {
            self.warned = true;
            warn!(slot = %self.slot, lag, bound, "postgres_cdc: the slot's lag is past 80 % of max_slot_lag_bytes; the job fails past it");
        }
        Ok(())
    }

    fn poll(&mut self) {
        if self.running.as_ref().is_some_and(|h| !h.is_finished()) || self.last.is_some_and(|t| t.elapsed() < LAG_EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        let (client, slot, metrics) = (self.client.clone(), self.slot.clone(), self.metrics.clone());
        self.running = Some(tokio::spawn(async move {
            let sql = "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1";
            let lag = client.query_opt(sql, &[&slot]).await.and_then(|row| row.map(|r| r.try_get::<_, Option<i64>>(0)).transpose());
            match lag {
                Ok(Some(Some(lag))) => metrics.set_gauge("slot_lag_bytes", lag),
                Ok(Some(None)) => {}
                Ok(None) => debug!(slot = %slot, "postgres_cdc: the slot is gone"),
                Err(e) => debug!(error = %e, "postgres_cdc: reading the slot lag"),
            }
        }));
    }
}

// ---------------------------------------------------------------------------------------------
// Setup: options, connections, table, publication, slot.

/// The declared columns (the output schema without the extra columns' object and the version).
fn declared_columns(o: &PostgresCdcOptions, schema: &Schema) -> Result<Vec<(String, DataType)>> {
    let mut fields: Vec<(String, DataType)> = schema.fields.iter().map(|f| (f.name.clone(), f.data_type)).collect();
    // The output ends with the extra columns' object, then the version.
    for (column, ty) in [(&o.version_column, DataType::Int), (&o.extra_columns, DataType::String)] {
        let Some(column) = column else { continue };
        match fields.pop() {
            Some((name, found)) if found == ty && name.eq_ignore_ascii_case(column) => {}
            _ => return Err(TaskError::internal(format!("postgres_cdc: the schema does not end with the column `{column}` {ty}"))),
        }
    }
    if fields.is_empty() {
        return Err(TaskError::user("options.columns: list the table's columns to read, e.g. `id BIGINT, name VARCHAR`"));
    }
    Ok(fields)
}

/// Prefix of the clock messages the source writes into the WAL.
const CLOCK_PREFIX: &str = "eddy-clock";

/// PostgreSQL's clock, carried through the WAL: every interval the source writes the server's
/// time as a non-transactional logical message (`pg_logical_emit_message`, which pgoutput passes
/// on in WAL order). When the stream delivers a message, every transaction that committed before
/// its time has been delivered before it, whichever session wrote it (any slot of the database
/// sees every message). So the watermark follows the database's clock: it moves on while the
/// table is quiet, and it stalls while the stream is behind or the job is down, where a wall
/// clock would close windows without the changes still to come. The messages cost a few dozen
/// bytes of WAL each.
struct Clock;

impl Clock {
    async fn write(control: &Client) -> Result<()> {
        let sql = format!(
            "SELECT pg_logical_emit_message(false, '{CLOCK_PREFIX}', (extract(epoch FROM clock_timestamp()) * 1000)::bigint::text)"
        );
        control.simple_query(&sql).await.map(|_| ()).map_err(|e| {
            TaskError::external(format!(
                "postgres_cdc: writing a clock message into the WAL (pg_logical_emit_message) failed: {}; the source \
                 needs it for its watermark (it has event_time): the user must be allowed to execute \
                 pg_logical_emit_message (everyone is, by default), or remove event_time from the source",
                e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string())
            ))
        })
    }

    /// Writes one every `every`. A failure fails the source (through `out`, as the reader's
    /// errors do): without the clock its watermark would stall for good, unseen.
    fn spawn(control: Arc<Client>, every: Duration, out: mpsc::Sender<Result<Chunk>>) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = Clock::write(&control).await {
                    let _ = out.send(Err(e)).await;
                    return;
                }
            }
        })
    }
}

/// The replication session's settings, from the same URL.
fn replication_config(pg: &tokio_postgres::Config, o: &PostgresCdcOptions, ctx: &ConnectorContext) -> Result<ReplicationConfig> {
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        Some(Host::Unix(dir)) => dir.to_string_lossy().into_owned(),
        None => "localhost".to_string(),
    };
    let user = pg.get_user().unwrap_or("postgres");
    let password = pg.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
    let database = pg.get_dbname().unwrap_or(user);
    Ok(ReplicationConfig::new(host, user, password, database, o.slot.clone(), o.publication.clone())
        .with_port(pg.get_ports().first().copied().unwrap_or(5432))
        .with_options(pg.get_options().unwrap_or(SESSION_OPTIONS))
        .with_status_interval(STATUS_INTERVAL)
        .with_buffer_size(REPLICATION_EVENTS)
        .with_application_name(format!("eddy-{}-{}", ctx.job_id, ctx.task)))
}

/// A temporary slot's exported snapshot, imported: the slot's consistent point, the session that
/// holds the slot (and with it the snapshot) until dropped, and the connection inside the
/// snapshot.
async fn temporary_snapshot(
    config: &ReplicationConfig,
    pg: &tokio_postgres::Config,
    control: &Client,
    metrics: &TaskMetrics,
) -> Result<(Lsn, ReplicationClient, Client)> {
    let mut temp =
        ReplicationClient::connect_gated(config.clone()).await.map_err(|e| wire_error("opening a session for a temporary slot", e))?;
    let name = format!("eddy_reread_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let (at, exported) = create_slot(&mut temp, control, metrics, &name, true, true).await?;
    let exported = exported.ok_or_else(|| TaskError::external("postgres_cdc: the temporary slot exported no snapshot"))?;
    let client = import_snapshot(pg, &exported).await?;
    Ok((at, temp, client))
}

/// The table, checked against the declared columns.
#[derive(Debug, Clone)]
struct Table {
    /// Its OID, which pgoutput's relation messages carry.
    oid: u32,
    /// Its schema and name, unquoted.
    schema: String,
    name: String,
    /// `"schema"."name"`, quoted for SQL.
    qualified: String,
    /// Declared columns in output order: (the table's spelling of the name, declared type).
    columns: Vec<(String, DataType)>,
    /// Which declared columns the table had when resolved (with `schema_changes = "evolve"` a
    /// declared column may be missing: it reads as NULL).
    present: Vec<bool>,
    /// Every column of the table when resolved: name and type OID.
    all: Vec<(String, u32)>,
    /// The name of the output column after the declared ones that carries the undeclared ones
    /// as a JSON object (`extra_columns`), if the job has it.
    extra: Option<String>,
    /// Rows end with the version column.
    versioned: bool,
}

/// A query of the table's rows: the declared columns in output order, then the undeclared ones
/// that go into the extra columns' object.
struct Select {
    sql: String,
    extras: Vec<(String, u32)>,
}

/// A table's columns (by its OID), in order: name, type OID and the type's name.
const COLUMNS_QUERY: &str = "SELECT attname::text, atttypid, format_type(atttypid, atttypmod) FROM pg_attribute \
                             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum";

impl Table {
    async fn resolve(
        control: &Client,
        name: &str,
        declared: Vec<(String, DataType)>,
        (extra, versioned): (Option<String>, bool),
        evolve: bool,
    ) -> Result<Table> {
        let context = "postgres_cdc: reading the table's definition";
        let sql = "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text, c.relreplident::text \
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)";
        let row = control.query_opt(sql, &[&name]).await.map_err(|e| pg_error(context, e))?.ok_or_else(|| {
            TaskError::user(format!("options.table: table `{name}` does not exist; create it or fix the name (e.g. public.events)"))
        })?;
        let (oid, schema, relname, kind, identity): (u32, String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        if kind != "r" {
            return Err(TaskError::user(format!("options.table: `{name}` is not a plain table (relkind `{kind}`)")));
        }
        let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&relname));
        if identity != "f" {
            return Err(TaskError::user(format!(
                "options.table: `{name}` must log complete old rows for updates and deletes: run `ALTER TABLE {qualified} REPLICA IDENTITY FULL`"
            )));
        }
        let actual = control.query(COLUMNS_QUERY, &[&oid]).await.map_err(|e| pg_error(context, e))?;
        let mut columns = Vec::with_capacity(declared.len());
        let mut present = Vec::with_capacity(declared.len());
        for (column, ty) in declared {
            let exact = actual.iter().find(|r| r.get::<_, String>(0) == column);
            let Some(found) = exact.or_else(|| actual.iter().find(|r| r.get::<_, String>(0).eq_ignore_ascii_case(&column))) else {
                if evolve {
                    info!(table = %qualified, column, "postgres_cdc: a declared column the table does not have (yet) reads as NULL");
                    columns.push((column, ty));
                    present.push(false);
                    continue;
                }
                let names: Vec<String> = actual.iter().map(|r| r.get::<_, String>(0)).collect();
                return Err(TaskError::user(format!(
                    "options.columns: table `{name}` has no column `{column}`; its columns are: {} (with options.schema_changes = \"evolve\" a declared column the table lacks reads as NULL until it is added)",
                    names.join(", ")
                )));
            };
            check_type(&column, ty, found.get(1), &found.get::<_, String>(2))?;
            columns.push((found.get(0), ty));
            present.push(true);
        }
        let all = actual.iter().map(|r| (r.get(0), r.get(1))).collect();
        Ok(Table { oid, schema, name: relname, qualified, columns, present, all, extra, versioned })
    }

    /// The snapshot query, over the columns the table had when resolved.
    fn select(&self) -> Select {
        self.select_in(&self.all)
    }

    /// The query of the table's rows when it has columns `now`: each declared column as the
    /// column it binds to ([`Table::bind`]), NULL where the table lacks it, and the undeclared
    /// ones last if the job carries them.
    fn select_in(&self, now: &[(String, u32)]) -> Select {
        let mut declared = vec!["NULL".to_string(); self.columns.len()];
        let mut extras = Vec::new();
        for (column, out) in now.iter().zip(self.bind(now.iter().map(|(n, _)| n.as_str()))) {
            match out {
                Some(out) => declared[out] = quote_ident(&column.0),
                None if self.extra.is_some() => extras.push(column.clone()),
                None => {}
            }
        }
        let columns: Vec<String> = declared.into_iter().chain(extras.iter().map(|(n, _)| quote_ident(n))).collect();
        Select { sql: format!("SELECT {} FROM {}", columns.join(", "), self.qualified), extras }
    }

    /// A declared column's output position (by the table's spelling, or case-insensitively).
    fn declared(&self, name: &str) -> Option<usize> {
        let columns = &self.columns;
        columns.iter().position(|(n, _)| n == name).or_else(|| columns.iter().position(|(n, _)| n.eq_ignore_ascii_case(name)))
    }

    /// Which declared column (its output position) each of the table's columns `names` is: a
    /// declared name is the column spelled the same, or else one that differs only in case (so of
    /// `id` and `"ID"` with `id` declared, `"ID"` is undeclared).
    fn bind<'a>(&self, names: impl Iterator<Item = &'a str>) -> Vec<Option<usize>> {
        let names: Vec<&str> = names.collect();
        let mut bound = vec![None; names.len()];
        for (out, (declared, _)) in self.columns.iter().enumerate() {
            let exact = names.iter().position(|n| n == declared);
            if let Some(at) = exact.or_else(|| names.iter().position(|n| n.eq_ignore_ascii_case(declared))) {
                bound[at] = Some(out);
            }
        }
        bound
    }

    /// Where the version goes in an output row.
    fn version_at(&self) -> usize {
        self.columns.len() + usize::from(self.extra.is_some())
    }

    /// Output row length.
    fn width(&self) -> usize {
        self.version_at() + usize::from(self.versioned)
    }
}

/// The extra columns' object of a row, from each undeclared column's name and value; NULL when
/// the table has none. A NULL value is left out, as a reader of the object reads a missing
/// field: so a row's retraction, whose old row the WAL gives with the columns added since as
/// NULL, has the object the row was sent with.
fn extra_object<'a>(columns: impl ExactSizeIterator<Item = (&'a str, serde_json::Value)>) -> Value {
    if columns.len() == 0 {
        return Value::Null;
    }
    let object: serde_json::Map<String, serde_json::Value> =
        columns.filter(|(_, value)| !value.is_null()).map(|(name, value)| (name.to_string(), value)).collect();
    Value::String(serde_json::Value::Object(object).to_string().into())
}

/// An undeclared column's value (PostgreSQL's text of type `oid`, `None` for NULL) as a declared
/// column of its type would be written: a BIGINT as a number, a TIMESTAMP as ISO 8601, and so
/// on; the text as it is where JSON has no such value (`NaN`, `Infinity`, a timestamp's
/// `infinity`).
fn extra_value(oid: u32, text: Option<&str>) -> serde_json::Value {
    match text.map(|t| (t, decode_value(t, natural_type(oid)))) {
        None => serde_json::Value::Null,
        Some((text, Ok(Value::Float(f)))) if !f.is_finite() => serde_json::Value::String(text.to_string()),
        Some((_, Ok(v))) => crate::json::to_json(&v),
        Some((text, Err(_))) => serde_json::Value::String(text.to_string()),
    }
}

/// One field of an extra columns' object written before (`None`: none, or not an object).
fn extra_field(object: &Value, name: &str) -> Option<serde_json::Value> {
    let Value::String(text) = object else { return None };
    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text).ok()?.remove(name)
}

/// PostgreSQL type OIDs the decoder knows.
mod oid {
    pub const BOOL: u32 = 16;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const NUMERIC: u32 = 1700;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
}

/// The type that reads values of PostgreSQL type `type_oid` as themselves.
fn natural_type(type_oid: u32) -> DataType {
    use oid::*;
    match type_oid {
        BOOL => DataType::Bool,
        INT2 | INT4 | INT8 | OID => DataType::Int,
        FLOAT4 | FLOAT8 | NUMERIC => DataType::Float,
        TIMESTAMPTZ | TIMESTAMP | DATE => DataType::Timestamp,
        _ => DataType::String,
    }
}

/// Whether values of PostgreSQL type `type_oid` can be read as `declared`.
fn check_type(column: &str, declared: DataType, type_oid: u32, type_name: &str) -> Result<()> {
    use oid::*;
    // VARCHAR reads any type's text, DOUBLE integers too.
    let fits = natural_type(type_oid);
    if declared == fits || declared == DataType::String || (declared == DataType::Float && matches!(type_oid, INT2 | INT4 | INT8)) {
        return Ok(());
    }
    Err(TaskError::user(format!(
        "options.columns: column `{column}` is `{type_name}` in the table and cannot be read as {declared:?}; declare it as {fits}"
    )))
}

/// The slots a publication's comment lists, if Eddy created it (`None`: the user's own).
fn publication_users(comment: Option<&str>) -> Option<Vec<String>> {
    let list = comment?.strip_prefix(PUBLICATION_MARK)?;
    // Only names a slot can have: the list goes back into SQL.
    Some(list.split(',').filter(|s| plain_identifier(s)).map(str::to_string).collect())
}

/// Creates the publication for the table if it is missing (noting in its comment that Eddy made
/// it, for the slot `slot`); checks an existing one publishes it, and adds `slot` to the users of
/// one Eddy made.
async fn ensure_publication(control: &Client, publication: &str, table: &Table, slot: &str) -> Result<()> {
    let context = "postgres_cdc: checking the publication";
    let sql = "SELECT p.pubinsert AND p.pubupdate AND p.pubdelete, \
                      EXISTS (SELECT 1 FROM pg_publication_tables t \
                              WHERE t.pubname = p.pubname AND t.schemaname = $2 AND t.tablename = $3), \
                      obj_description(p.oid, 'pg_publication') \
               FROM pg_publication p WHERE p.pubname = $1";
    control.batch_execute(&format!("BEGIN; {}", publication_lock(publication))).await.map_err(|e| pg_error(context, e))?;
    let checked = async {
        let Some(row) = control.query_opt(sql, &[&publication, &table.schema, &table.name]).await.map_err(|e| pg_error(context, e))? else {
            let create = format!(
                "CREATE PUBLICATION {publication} FOR TABLE {}; COMMENT ON PUBLICATION {publication} IS '{PUBLICATION_MARK}{slot}'",
                table.qualified
            );
            control.batch_execute(&create).await.map_err(|e| pg_error("postgres_cdc: creating the publication", e))?;
            info!(publication, table = %table.qualified, "postgres_cdc: created the publication");
            return Ok(());
        };
        let (all_changes, has_table, comment): (bool, bool, Option<String>) = (row.get(0), row.get(1), row.get(2));
        let users = publication_users(comment.as_deref());
        // Eddy's own publication takes another job's table (several tables, one publication).
        if !has_table && users.is_some() {
            let add = format!("ALTER PUBLICATION {publication} ADD TABLE {}", table.qualified);
            control.batch_execute(&add).await.map_err(|e| pg_error("postgres_cdc: adding the table to the publication", e))?;
            info!(publication, table = %table.qualified, "postgres_cdc: added the table to the publication");
        } else if !has_table {
            return Err(TaskError::user(format!(
                "options.publication: publication `{publication}` exists but does not include {0}; run `ALTER PUBLICATION {publication} ADD TABLE {0}` or name another publication",
                table.qualified
            )));
        }
        if !all_changes {
            return Err(TaskError::user(format!(
                "options.publication: publication `{publication}` must publish inserts, updates and deletes; run `ALTER PUBLICATION {publication} SET (publish = 'insert, update, delete')`"
            )));
        }
        if let Some(mut users) = users.filter(|u| !u.iter().any(|s| s == slot)) {
            users.push(slot.to_string());
            let sql = format!("COMMENT ON PUBLICATION {publication} IS '{PUBLICATION_MARK}{}'", users.join(","));
            control.batch_execute(&sql).await.map_err(|e| pg_error(context, e))?;
        }
        Ok(())
    };
    let checked = checked.await;
    let end = if checked.is_ok() { "COMMIT" } else { "ROLLBACK" };
    control.batch_execute(end).await.map_err(|e| pg_error(context, e))?;
    checked
}

/// The job using `slot` ended for good: takes it off the users of the publication, and drops the
/// publication if Eddy created it and no other job's slot uses it (one statement, shared with the
/// coordinator). Best effort, like the slot's.
async fn release_publication(control: &Client, publication: &str, slot: &str) {
    let Some(sql) = eddy_jobs::postgres::release_publication(publication, slot) else { return };
    match control.batch_execute(&sql).await {
        Ok(()) => info!(publication, slot, "postgres_cdc: released the publication (dropped if Eddy created it and no other slot uses it)"),
        Err(e) => {
            warn!(publication, error = %e, "postgres_cdc: could not release the publication; drop it by hand once no job uses it (DROP PUBLICATION)")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The reader task: snapshot, then stream.

struct Reader {
    out: mpsc::Sender<Result<Chunk>>,
    /// Positions the source has handed on.
    confirm: watch::Receiver<Lsn>,
    changes: Changes,
    metrics: Arc<TaskMetrics>,
    control: Arc<Client>,
    slot: String,
    job_id: String,
    /// Without checkpoints, a slot whose snapshot was not handed on is dropped when the reader
    /// fails; with them, it is kept for the restart to read again under the same versions.
    release_on_failure: bool,
    /// The snapshot to read (first, or when a re-read's stream reaches `Changes::reread_at`).
    snapshot: Option<SnapshotRead>,
    /// Not every snapshot row has been handed on yet.
    snapshot_pending: bool,
    /// Clock messages are passed on (the source has event time); other sources' are ignored.
    clocked: bool,
    /// Sharing a new job's snapshot: the connection settings, the parallelism and what to offer
    /// the other subtasks before reading (see [`handoff`]).
    offer: Option<(tokio_postgres::Config, u32, Option<SharedSnapshot>)>,
    /// Backfills to carry out, in order (see [`super::backfill`]), and one taken from there
    /// while the stream was inside a transaction.
    backfills: mpsc::UnboundedReceiver<Backfill>,
    waiting_backfill: Option<Backfill>,
    /// Connection settings, for a backfill's snapshot.
    pg: tokio_postgres::Config,
    replication: ReplicationConfig,
}

/// A snapshot to read: the connection that imported it, the temporary slot's session that
/// exported it (a re-read or a backfill; it must stay open until the snapshot is read), and
/// what to read of it.
struct SnapshotRead {
    client: Client,
    exporter: Option<ReplicationClient>,
    what: Reading,
}

enum Reading {
    /// The table: the snapshot's chunks and those this subtask reads, then the source's word
    /// that every snapshot batch was handed on.
    Chunks { plan: ChunkPlan, todo: Vec<u32>, handed_on: oneshot::Receiver<()> },
    /// A backfill's rows.
    Backfill(Backfill),
}

/// Why the reader stops: an error, for `next_batch` to report, or [`CLOSED`].
type Halt = Option<TaskError>;
/// The source is gone: nobody is left to read for.
const CLOSED: Halt = None;

impl Reader {
    async fn run(mut self, mut repl: ReplicationClient) {
        if let Err(halt) = self.read_and_stream(&mut repl).await {
            // Without checkpoints a failure before the snapshot was handed on drops the new slot,
            // so that a restart does not find one that looks complete (the session holding it
            // goes first).
            drop(repl);
            if self.release_on_failure && self.snapshot_pending {
                abandon_slot(&self.control, &self.slot, "its snapshot was not handed on").await;
            }
            if let Some(e) = halt {
                // If the source is gone too, nobody needs to hear it.
                let _ = self.out.send(Err(e)).await;
            }
        }
    }

    async fn send(&self, chunk: Chunk) -> std::result::Result<(), Halt> {
        self.out.send(Ok(chunk)).await.map_err(|_| CLOSED)
    }

    /// Reads this subtask's chunks of the snapshot, every row under version `Changes::floor` but
    /// those a re-read's stream touched, and waits until they are all handed on (the stream is not
    /// confirmed before).
    async fn read_snapshot(&mut self, snapshot: SnapshotRead) -> std::result::Result<(), Halt> {
        let SnapshotRead { client, exporter, what } = snapshot;
        let (plan, todo, handed_on) = match what {
            Reading::Chunks { plan, todo, handed_on } => (plan, todo, handed_on),
            Reading::Backfill(b) => return self.read_backfill(client, exporter, b).await,
        };
        let version = self.changes.table.versioned.then_some(Value::Int(self.changes.floor.0 as i64));
        info!(job_id = %self.job_id, table = %self.changes.table.qualified, chunks = todo.len(), of = plan.total, estimated_rows = plan.estimated_rows, "postgres_cdc: reading the snapshot");
        let changes = &self.changes;
        let skip = |row: &Row| !changes.touched.is_empty() && changes.touched.contains(&changes.key_of(row));
        let progress = SnapshotProgress::start(self.metrics.clone(), plan.estimate(todo.len()), todo.len());
        let select = changes.table.select();
        let (done, skipped) = copy_chunks(&client, &changes.table, &select, &plan, &todo, version, skip, &self.out, progress).await?;
        client.batch_execute("COMMIT").await.map_err(|e| Some(pg_error("postgres_cdc: ending the snapshot", e)))?;
        info!(job_id = %self.job_id, rows = done, skipped, "postgres_cdc: snapshot read (skipped: rows the stream changed); streaming once it is handed on");
        self.send(Chunk::SnapshotEnd).await?;
        // A temporary slot goes with its session once its snapshot is read.
        drop((client, exporter));
        handed_on.await.map_err(|_| CLOSED)?;
        self.snapshot_pending = false;
        Ok(())
    }

    /// The snapshot (unless a re-read: then the stream reads it when it gets there), then the
    /// stream, until an error or until the source is gone.
    async fn read_and_stream(&mut self, repl: &mut ReplicationClient) -> std::result::Result<(), Halt> {
        // The slot's exported snapshot lives while `repl` stays idle: shared out before anything else.
        let mut shares = None;
        if let Some((pg, parallelism, offer)) = self.offer.take() {
            shares = Some(handoff::offer(&pg, &self.job_id, &self.slot, offer, parallelism).await?);
        }
        if let Some(snapshot) = self.snapshot.take_if(|_| !self.changes.rereading()) {
            self.read_snapshot(snapshot).await?;
        }
        // The changes follow every subtask's snapshot rows.
        if let Some(shares) = shares {
            shares.wait_done().await?;
        }
        repl.start().await.map_err(|e| wire_error("starting replication", e))?;
        repl.wait_started().await.map_err(|e| wire_error("starting replication", e))?;
        info!(job_id = %self.job_id, slot = %self.slot, from = %self.changes.start, "postgres_cdc: streaming changes");
        let mut pending = Batch::with_capacity(BATCH_ROWS + 1);
        // Bytes of the messages behind `pending`.
        let mut pending_bytes = 0;
        // End of the last transaction read completely (and the last version given out by then),
        // not yet attached to a chunk.
        let mut completed: Option<(Lsn, u64)> = None;
        // Highest position attached to a chunk so far.
        let mut sent = self.changes.start;
        let mut in_transaction = false;
        // A clock message read, to pass on after the rows before it.
        let mut clock = None;
        loop {
            if pending.is_empty() {
                pending_bytes = 0;
            }
            // Pass on what the source handed on; the library reports it to the server.
            if self.confirm.has_changed().map_err(|_| CLOSED)? {
                repl.update_applied_lsn(*self.confirm.borrow_and_update());
            }
            // A backfill begins between transactions, one at a time.
            if !in_transaction && !self.changes.rereading() {
                if let Some(b) = self.waiting_backfill.take().or_else(|| self.backfills.try_recv().ok()) {
                    self.begin_backfill(b).await?;
                }
            }
            let event = if pending.is_empty() && completed.is_none() && clock.is_none() {
                tokio::select! {
                    biased;
                    // A newly handed-on position should reach the server even when nothing else happens.
                    changed = self.confirm.changed() => {
                        changed.map_err(|_| CLOSED)?;
                        repl.update_applied_lsn(*self.confirm.borrow_and_update());
                        continue;
                    }
                    // A backfill ordered while the stream is quiet.
                    Some(b) = self.backfills.recv(), if self.waiting_backfill.is_none() => {
                        self.waiting_backfill = Some(b);
                        continue;
                    }
                    event = repl.recv() => event,
                }
            } else {
                // Something is waiting to go out: take another event only if one is ready now.
                match tokio::time::timeout(Duration::ZERO, repl.recv()).await {
                    Ok(event) => event,
                    Err(_) => {
                        if let Some((lsn, _)) = completed {
                            sent = sent.max(lsn);
                        }
                        if !pending.is_empty() {
                            let batch = std::mem::replace(&mut pending, Batch::with_capacity(BATCH_ROWS + 1));
                            self.send(Chunk::Rows { batch, confirm: completed.take() }).await?;
                        } else if let Some((lsn, version)) = completed.take() {
                            self.send(Chunk::Progress(lsn, version)).await?;
                        }
                        if let Some(t) = clock.take() {
                            self.send(Chunk::Clock(t)).await?;
                        }
                        continue;
                    }
                }
            };
            let event = event
                .map_err(|e| wire_error("reading the replication stream", e))?
                .ok_or_else(|| TaskError::external("postgres_cdc: the server ended the replication stream"))?;
            match event {
                ReplicationEvent::Begin { final_lsn, .. } => {
                    if self.changes.rereading() && final_lsn >= self.changes.reread_at {
                        self.reread(&mut pending).await?;
                    }
                    in_transaction = true;
                }
                ReplicationEvent::XLogData { wal_start, data, .. } => {
                    pending_bytes += data.len();
                    self.changes.on_message(&data, wal_start, &mut pending)?;
                }
                // Nothing is confirmed before a re-read's snapshot is read.
                ReplicationEvent::Commit { end_lsn, .. } => {
                    in_transaction = false;
                    if !self.changes.rereading() {
                        let end = completed.map_or(end_lsn, |(c, _)| c.max(end_lsn));
                        completed = Some((end, self.changes.last));
                    }
                    // A new description of the table goes out with the end of its transaction,
                    // so that a checkpoint holds it only with a position past it.
                    if std::mem::take(&mut self.changes.described) {
                        let batch = std::mem::replace(&mut pending, Batch::with_capacity(BATCH_ROWS + 1));
                        let confirm = completed.take();
                        if let Some((lsn, _)) = confirm {
                            sent = sent.max(lsn);
                        }
                        match confirm {
                            _ if !batch.is_empty() => self.send(Chunk::Rows { batch, confirm }).await?,
                            Some((lsn, version)) => self.send(Chunk::Progress(lsn, version)).await?,
                            None => {}
                        }
                        self.send(Chunk::Schema(self.changes.known.clone().unwrap_or_default())).await?;
                    }
                }
                // Between transactions, the server's WAL end is safe to confirm once all before it is.
                ReplicationEvent::KeepAlive { wal_end, .. } => {
                    if !in_transaction && self.changes.rereading() && wal_end >= self.changes.reread_at {
                        self.reread(&mut pending).await?;
                    }
                    if !in_transaction && !self.changes.rereading() && wal_end > sent && completed.is_none_or(|(c, _)| wal_end > c) {
                        completed = Some((wal_end, self.changes.last));
                    }
                }
                // Not while a re-read's snapshot is still to come: its rows are older than any clock.
                ReplicationEvent::Message { transactional: false, prefix, content, .. }
                    if self.clocked && prefix == CLOCK_PREFIX && !in_transaction && !self.changes.rereading() =>
                {
                    // The latest of those read (`None` sorts first).
                    clock = clock.max(std::str::from_utf8(&content).ok().and_then(|t| t.parse::<i64>().ok()));
                }
                ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
            }
            if pending.len() >= BATCH_ROWS || pending_bytes >= BATCH_BYTES {
                let batch = std::mem::replace(&mut pending, Batch::with_capacity(BATCH_ROWS + 1));
                let confirm = completed.take();
                if let Some((lsn, _)) = confirm {
                    sent = sent.max(lsn);
                }
                self.send(Chunk::Rows { batch, confirm }).await?;
            }
        }
    }

    /// Backfill `b`, whose snapshot the stream has reached: its point (unless a checkpoint held
    /// it already: a replay), once a completed checkpoint holds that, its rows (see
    /// [`super::backfill`]). A condition that fails on the server fails the backfill, not the job.
    async fn read_backfill(&mut self, client: Client, exporter: Option<ReplicationClient>, b: Backfill) -> std::result::Result<(), Halt> {
        let version = match b.point {
            Some(point) => point.version,
            None => {
                let point = Point { at: self.changes.reread_at.0, version: self.changes.last + 1 };
                self.changes.last = point.version;
                let (held, wait) = oneshot::channel();
                self.send(Chunk::BackfillPoint { id: b.id, point, held }).await?;
                info!(job_id = %self.job_id, backfill = b.id, at = %self.changes.reread_at, version = point.version, "postgres_cdc: backfill at its point; its rows follow once a checkpoint holds it");
                wait.await.map_err(|_| CLOSED)?;
                point.version
            }
        };
        let changes = &self.changes;
        let skip = |row: &Row| !changes.touched.is_empty() && changes.touched.contains(&changes.key_of(row));
        // The columns the table has in the backfill's snapshot (the stream describes the table only
        // with its next change).
        let now: Vec<(String, u32)> = match client.query(COLUMNS_QUERY, &[&changes.table.oid]).await {
            Ok(rows) => rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
            Err(e) => return Err(Some(pg_error("postgres_cdc: reading the table's columns for a backfill", e))),
        };
        let mut select = changes.table.select_in(&now);
        select.sql = backfill::rows_query(&select.sql, &b.filter);
        let progress = SnapshotProgress::of("backfill", self.metrics.clone(), 0, 1);
        let versioned = Some(Value::Int(version as i64));
        let read = copy_chunks(&client, &changes.table, &select, &ChunkPlan::whole(), &[0], versioned, skip, &self.out, progress).await;
        let end = match read {
            Ok((read, skipped)) => Chunk::BackfillEnd { id: b.id, rows: read - skipped as i64, skipped },
            // The server answered: the condition failed on some row (a division by zero, a cast).
            Err(Some(e)) if !client.is_closed() => {
                let sent = self.metrics.gauge("backfill_rows_done").unwrap_or(0);
                Chunk::BackfillFailed { id: b.id, why: format!("{} (after {sent} rows went out again)", e.message) }
            }
            Err(halt) => return Err(halt),
        };
        drop((client, exporter));
        self.send(end).await
    }

    /// Starts backfill `b` (see [`super::backfill`]): checks its condition, then takes a
    /// temporary slot's snapshot, which the stream reads once it gets there. What fails here
    /// fails the backfill, said in the source's figures, and the stream carries on.
    async fn begin_backfill(&mut self, b: Backfill) -> std::result::Result<(), Halt> {
        let check = backfill::check_query(&self.changes.table.qualified, &b.filter);
        match self.control.query(&check, &[]).await {
            Err(e) if e.as_db_error().is_some() => {
                let why = pg_error(&format!("the condition `{}`", b.filter), e).message;
                return self.send(Chunk::BackfillFailed { id: b.id, why }).await;
            }
            Err(e) => return Err(Some(pg_error("postgres_cdc: checking a backfill's condition", e))),
            Ok(_) => {}
        }
        match temporary_snapshot(&self.replication, &self.pg, &self.control, &self.metrics).await {
            Ok((at, temp, client)) => {
                info!(job_id = %self.job_id, backfill = b.id, filter = %b.filter, snapshot = %at, "postgres_cdc: backfill under way; reading its rows once the stream reaches its snapshot");
                self.changes.reread_at = at;
                self.snapshot = Some(SnapshotRead { client, exporter: Some(temp), what: Reading::Backfill(b) });
                Ok(())
            }
            // The server's settings (no slot left): the user's to change; the stream carries on.
            Err(e) if e.blame == Blame::User => self.send(Chunk::BackfillFailed { id: b.id, why: e.message }).await,
            Err(e) => Err(Some(e)),
        }
    }

    /// A re-read's stream has reached the temporary slot's snapshot: what it read goes on, then
    /// the snapshot's rows it did not touch.
    async fn reread(&mut self, pending: &mut Batch) -> std::result::Result<(), Halt> {
        if !pending.is_empty() {
            let batch = std::mem::replace(pending, Batch::with_capacity(BATCH_ROWS + 1));
            self.send(Chunk::Rows { batch, confirm: None }).await?;
        }
        debug!(job_id = %self.job_id, slot = %self.slot, at = %self.changes.reread_at, touched = self.changes.touched.len(), "postgres_cdc: caught up with the snapshot; reading it");
        let snapshot = self.snapshot.take().ok_or_else(|| TaskError::internal("postgres_cdc: a re-read without its snapshot"))?;
        self.read_snapshot(snapshot).await?;
        self.changes.reread_at = Lsn(0);
        self.changes.touched = HashSet::new();
        Ok(())
    }
}

/// Reads chunks `todo` of `plan` of `select` (the table's rows, maybe with a condition)
/// through `client` (inside the snapshot), every row under `version` but those `skip` names, to
/// `out`, telling it where each chunk ends, with figures in `progress`. Rows read and rows
/// skipped.
#[allow(clippy::too_many_arguments)]
async fn copy_chunks(
    client: &Client,
    table: &Table,
    select: &Select,
    plan: &ChunkPlan,
    todo: &[u32],
    version: Option<Value>,
    skip: impl Fn(&Row) -> bool,
    out: &mpsc::Sender<Result<Chunk>>,
    mut progress: SnapshotProgress,
) -> std::result::Result<(i64, usize), Halt> {
    let send = |chunk| async { out.send(Ok(chunk)).await.map_err(|_| CLOSED) };
    let mut skipped = 0;
    for &n in todo {
        let mut rows = ChunkRows::open(client, &select.sql, plan, n).await?;
        let mut batch = Batch::with_capacity(BATCH_ROWS);
        // Bytes and rows (sent or skipped) since the last batch.
        let (mut bytes, mut read) = (0, 0);
        while let Some(line) = rows.next().await? {
            let width = table.columns.len() + select.extras.len();
            let mut fields = Vec::with_capacity(width);
            copy_fields(&line, &mut fields)
                .map_err(|m| TaskError::external(format!("postgres_cdc: the snapshot of {}: {m}", table.qualified)))?;
            if fields.len() != width {
                return Err(Some(TaskError::internal(format!(
                    "postgres_cdc: a snapshot row of {} has {} fields for {width} columns",
                    table.qualified,
                    fields.len(),
                ))));
            }
            let mut row = Vec::with_capacity(table.width());
            for (field, (name, ty)) in fields.iter().zip(&table.columns) {
                row.push(match field {
                    None => Value::Null,
                    Some(text) => decode_value(text, *ty).map_err(|m| value_error(name, &m, "the snapshot"))?,
                });
            }
            if table.extra.is_some() {
                let texts = fields[table.columns.len()..].iter().map(|f| f.as_deref());
                row.push(extra_object(select.extras.iter().zip(texts).map(|((n, oid), text)| (n.as_str(), extra_value(*oid, text)))));
            }
            bytes += line.len();
            read += 1;
            if skip(&row) {
                skipped += 1;
                continue;
            }
            row.extend(version.clone());
            batch.push(row, Op::Insert);
            if batch.len() >= BATCH_ROWS || bytes >= BATCH_BYTES {
                progress.rows(std::mem::take(&mut read));
                send(Chunk::Rows { batch: std::mem::replace(&mut batch, Batch::with_capacity(BATCH_ROWS)), confirm: None }).await?;
                bytes = 0;
            }
        }
        progress.rows(read);
        if !batch.is_empty() {
            send(Chunk::Rows { batch, confirm: None }).await?;
        }
        send(Chunk::Read(n)).await?;
        progress.chunk_done();
    }
    Ok((progress.finish(), skipped))
}

/// A subtask other than 0 of a new job: takes its share of the snapshot subtask 0 offers (see
/// [`handoff`]), reads it under the slot's consistent point, and ends; the source then idles.
struct ShareReader {
    /// The source's word that every batch of the share was handed on.
    handed_on: oneshot::Receiver<()>,
    pg: tokio_postgres::Config,
    job_id: String,
    slot: String,
    subtask: u32,
    parallelism: u32,
    table: Table,
    metrics: Arc<TaskMetrics>,
    out: mpsc::Sender<Result<Chunk>>,
}

impl ShareReader {
    async fn run(mut self) {
        if let Err(Some(e)) = self.read().await {
            let _ = self.out.send(Err(e)).await;
        }
    }

    async fn read(&mut self) -> std::result::Result<(), Halt> {
        let send = |chunk| async { self.out.send(Ok(chunk)).await.map_err(|_| CLOSED) };
        let (listener, offered) = handoff::wait_offer(&self.pg, &self.job_id, &self.slot).await?;
        let Some(shared) = offered else {
            handoff::tell(&listener, &self.job_id, &self.slot, self.subtask, false).await?;
            return send(Chunk::SnapshotEnd).await;
        };
        let client = import_snapshot(&self.pg, &shared.name).await?;
        handoff::tell(&listener, &self.job_id, &self.slot, self.subtask, false).await?;
        send(Chunk::Plan(shared.plan, Lsn(shared.at))).await?;
        let todo = shared.plan.share(self.subtask, self.parallelism);
        info!(job_id = %self.job_id, subtask = self.subtask, chunks = todo.len(), of = shared.plan.total, "postgres_cdc: reading this subtask's share of the snapshot");
        let version = self.table.versioned.then_some(Value::Int(shared.at as i64));
        let progress = SnapshotProgress::start(self.metrics.clone(), shared.plan.estimate(todo.len()), todo.len());
        let select = self.table.select();
        let (rows, _) = copy_chunks(&client, &self.table, &select, &shared.plan, &todo, version, |_| false, &self.out, progress).await?;
        client.batch_execute("COMMIT").await.map_err(|e| Some(pg_error("postgres_cdc: ending the snapshot", e)))?;
        info!(job_id = %self.job_id, subtask = self.subtask, rows, "postgres_cdc: this subtask's share of the snapshot read");
        send(Chunk::SnapshotEnd).await?;
        (&mut self.handed_on).await.map_err(|_| CLOSED)?;
        handoff::tell(&listener, &self.job_id, &self.slot, self.subtask, true).await?;
        Ok(())
    }
}

/// Turns pgoutput messages for the table into changelog rows.
struct Changes {
    table: Table,
    /// Where each column of the latest relation message for the table goes in an output row.
    relation: Option<Vec<Option<usize>>>,
    /// The columns of that message that go into the extra columns' object: position, name and
    /// type OID.
    extras: Vec<(usize, String, u32)>,
    /// The table's columns (name, type OID) as last described (`None`: unknown, the next
    /// description is taken as it is); a description that differs is a schema change.
    known: Option<Vec<(String, u32)>>,
    /// `known` changed since the reader last passed it on.
    described: bool,
    /// What a schema change does.
    policy: SchemaChanges,
    /// The slot position this run streams from (and the snapshot rows' version).
    start: Lsn,
    /// Changes get at least version `floor + 1`: the slot's consistent point, where its snapshot
    /// was taken, so a change committed after the snapshot outranks the snapshot's row even if its
    /// WAL record is older. Kept for the slot's whole life (in checkpoints), so a replay after a
    /// restore gives every change the version it had the first time.
    floor: Lsn,
    /// The last version given to a change. Each change gets its WAL position, raised above this
    /// (and above `floor`): versions are distinct and grow in stream order, which per row is commit
    /// order, even for several changes of one transaction whose records precede `floor`.
    /// Checkpointed with the position it belongs to, so a replay repeats them exactly.
    last: u64,
    /// Key columns (output positions).
    key: Vec<usize>,
    /// During a re-read: the temporary slot's consistent point, where its snapshot was taken (0:
    /// not re-reading). The transactions that commit before it are in that snapshot too.
    reread_at: Lsn,
    /// During a re-read: the keys (encoded) of the rows the stream changed before `reread_at`,
    /// which the snapshot does not send again.
    touched: HashSet<Vec<u8>>,
}

impl Changes {
    fn rereading(&self) -> bool {
        self.reread_at.0 != 0
    }

    fn key_of(&self, row: &[Value]) -> Vec<u8> {
        let mut key = Vec::new();
        for &k in &self.key {
            crate::codec::encode_value(&row[k], &mut key);
        }
        key
    }

    fn touch(&mut self, row: &[Value]) {
        if self.rereading() {
            self.touched.insert(self.key_of(row));
        }
    }

    /// Applies one pgoutput message to the pending batch.
    fn on_message(&mut self, data: &[u8], wal_start: Lsn, pending: &mut Batch) -> Result<()> {
        let message = decode_pgoutput(data).map_err(|m| TaskError::internal(format!("postgres_cdc: at {wal_start}: {m}")))?;
        let version = wal_start.0.max(self.floor.0 + 1).max(self.last + 1);
        match message {
            PgOutput::Relation(rel) if rel.id == self.table.oid => self.on_relation(&rel, wal_start)?,
            PgOutput::Insert { relation, new } if relation == self.table.oid => {
                let row = self.row(&new, None, version, wal_start)?;
                self.touch(&row);
                pending.push(row, Op::Insert);
                self.last = version;
            }
            PgOutput::Update { relation, old, new } if relation == self.table.oid => {
                let Some(OldTuple::Full(old)) = old else { return Err(self.identity_error("an update")) };
                let old = self.row(&old, None, version, wal_start)?;
                let new = self.row(&new, Some(&old), version, wal_start)?;
                self.touch(&old);
                self.touch(&new);
                pending.push(old, Op::Retract);
                pending.push(new, Op::Insert);
                self.last = version;
            }
            PgOutput::Delete { relation, old } if relation == self.table.oid => {
                let OldTuple::Full(old) = old else { return Err(self.identity_error("a delete")) };
                let old = self.row(&old, None, version, wal_start)?;
                self.touch(&old);
                pending.push(old, Op::Retract);
                self.last = version;
            }
            PgOutput::Truncate { relations } if relations.contains(&self.table.oid) => {
                warn!(table = %self.table.qualified, lsn = %wal_start, "postgres_cdc: TRUNCATE skipped: its rows cannot be retracted, so downstream keeps them");
            }
            _ => {}
        }
        Ok(())
    }

    fn identity_error(&self, what: &str) -> TaskError {
        TaskError::user(format!(
            "postgres_cdc: {what} on {0} came without its complete old row; run `ALTER TABLE {0} REPLICA IDENTITY FULL`",
            self.table.qualified
        ))
    }

    /// Takes a relation message: checks it against the columns known before (a schema change
    /// goes by `policy`) and maps its columns to output positions.
    fn on_relation(&mut self, rel: &Relation, lsn: Lsn) -> Result<()> {
        let now: Vec<(String, u32)> = rel.columns.iter().map(|c| (c.name.clone(), c.type_oid)).collect();
        // Nothing to compare with: the declared columns the table had must still be there.
        if self.known.is_none() && self.policy == SchemaChanges::Fail {
            let had = self.table.columns.iter().zip(&self.table.present).filter(|(_, here)| **here);
            if let Some(((name, _), _)) = had.clone().find(|((n, _), _)| !now.iter().any(|(m, _)| m == n)) {
                return Err(TaskError::user(format!(
                    "options.columns: table {} no longer has column `{name}`; fix options.columns or the table",
                    self.table.qualified
                )));
            }
        }
        if let Some(before) = self.known.as_ref().filter(|before| **before != now) {
            self.schema_change(before, &now, lsn)?;
        }
        if self.known.as_ref() != Some(&now) {
            self.known = Some(now);
            self.described = true;
        }
        let map = self.map_relation(rel)?;
        self.extras = match self.table.extra {
            None => Vec::new(),
            Some(_) => rel
                .columns
                .iter()
                .zip(&map)
                .enumerate()
                .filter(|(_, (_, out))| out.is_none())
                .map(|(at, (c, _))| (at, c.name.clone(), c.type_oid))
                .collect(),
        };
        self.relation = Some(map);
        Ok(())
    }

    /// The table's columns went from `before` to `now` at `lsn`.
    fn schema_change(&self, before: &[(String, u32)], now: &[(String, u32)], lsn: Lsn) -> Result<()> {
        let t = &self.table.qualified;
        let added: Vec<&(String, u32)> = now.iter().filter(|(n, _)| !before.iter().any(|(b, _)| b == n)).collect();
        let dropped: Vec<&(String, u32)> = before.iter().filter(|(b, _)| !now.iter().any(|(n, _)| n == b)).collect();
        let names = |cs: &[&(String, u32)]| cs.iter().map(|(n, _)| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        if !added.is_empty() && !dropped.is_empty() {
            return Err(TaskError::user(format!(
                "postgres_cdc: at {lsn}, table {t} lost column {} and gained {}: a rename, or a column replaced? Eddy does not \
                 guess which. Undo it, or update options.columns and submit the job again with a new snapshot",
                names(&dropped),
                names(&added)
            )));
        }
        for (name, oid) in now {
            if let Some((_, old)) = before.iter().find(|(b, o)| b == name && o != oid) {
                return Err(TaskError::user(format!(
                    "postgres_cdc: at {lsn}, column `{name}` of {t} changed type (type OID {old} to {oid}); Eddy does not convert \
                     a column's values from one type to another. Undo it, or update options.columns and submit the job again \
                     with a new snapshot"
                )));
            }
        }
        let fail = self.policy == SchemaChanges::Fail;
        for (name, _) in dropped {
            match (self.table.declared(name), fail) {
                (None, true) if self.table.extra.is_some() => {
                    return Err(TaskError::user(format!(
                        "postgres_cdc: at {lsn}, column `{name}` was dropped from {t}, and options.extra_columns carries it; with \
                         options.schema_changes = \"fail\" the job stops here. Submit the job again (existing_slot = \"resume\" \
                         goes on from the slot), or set schema_changes = \"evolve\" to carry on without it"
                    )))
                }
                (None, true) => info!(table = %t, column = %name, %lsn, "postgres_cdc: a column the job does not read was dropped"),
                (None, false) => info!(table = %t, column = %name, %lsn, "postgres_cdc: a column the job does not declare was dropped"),
                (Some(_), true) => {
                    return Err(TaskError::user(format!(
                        "postgres_cdc: at {lsn}, column `{name}` was dropped from {t}, and options.columns reads it; with \
                         options.schema_changes = \"fail\" the job stops here. Remove it from options.columns and submit the job \
                         again (existing_slot = \"resume\" goes on from the slot), or set schema_changes = \"evolve\" to read it as \
                         NULL from then on"
                    )))
                }
                (Some(_), false) => {
                    warn!(table = %t, column = %name, %lsn, "postgres_cdc: a column the job reads was dropped; it reads as NULL from here on")
                }
            }
        }
        for (name, oid) in added {
            match (self.table.declared(name), fail) {
                (Some(_), _) => {
                    info!(table = %t, column = %name, %lsn, "postgres_cdc: a declared column was added to the table; its values flow from here on")
                }
                (None, true) => {
                    return Err(TaskError::user(format!(
                        "postgres_cdc: at {lsn}, column `{name}` (type OID {oid}) was added to {t}, and options.columns does not \
                         read it; with options.schema_changes = \"fail\" the job stops here. To carry it downstream, declare it \
                         in options.columns (rows from before it read it as NULL) and submit the job again (existing_slot = \
                         \"resume\" goes on from the slot); or set schema_changes = \"evolve\" to carry on (in the column \
                         options.extra_columns names, if set; without it if not)"
                    )))
                }
                (None, false) => match &self.table.extra {
                    Some(extra) => {
                        info!(table = %t, column = %name, %lsn, extra = %extra, "postgres_cdc: a column was added that options.columns does not declare; carried in the extra columns")
                    }
                    None => {
                        warn!(table = %t, column = %name, %lsn, "postgres_cdc: a column was added that options.columns does not declare; not read (options.extra_columns would carry it)")
                    }
                },
            }
        }
        Ok(())
    }

    /// Maps a relation message's columns to output positions; a declared column it lacks reads
    /// as NULL (the checks above have refused that where the policy does not allow it).
    fn map_relation(&self, rel: &Relation) -> Result<Vec<Option<usize>>> {
        let map = self.table.bind(rel.columns.iter().map(|c| c.name.as_str()));
        for (column, out) in rel.columns.iter().zip(&map) {
            if let Some(out) = *out {
                let (name, ty) = &self.table.columns[out];
                check_type(name, *ty, column.type_oid, &format!("type oid {}", column.type_oid))?;
            }
        }
        Ok(map)
    }

    /// The output row of a tuple; `old` supplies unchanged TOASTed values.
    fn row(&self, tuple: &[Datum<'_>], old: Option<&Row>, version: u64, lsn: Lsn) -> Result<Row> {
        let map = self
            .relation
            .as_ref()
            .ok_or_else(|| TaskError::internal(format!("postgres_cdc: at {lsn}: a change came before its relation message")))?;
        if tuple.len() != map.len() {
            return Err(TaskError::internal(format!(
                "postgres_cdc: at {lsn}: a tuple of {} columns for a relation of {}",
                tuple.len(),
                map.len()
            )));
        }
        let mut row = vec![Value::Null; self.table.width()];
        for (datum, out) in tuple.iter().zip(map) {
            let Some(out) = *out else { continue };
            let (name, ty) = &self.table.columns[out];
            row[out] = match datum {
                Datum::Null => Value::Null,
                Datum::Text(text) => decode_value(text, *ty).map_err(|m| value_error(name, &m, &format!("the change at {lsn}")))?,
                Datum::Unchanged => old.map(|o| o[out].clone()).ok_or_else(|| {
                    TaskError::internal(format!("postgres_cdc: at {lsn}: column `{name}` is an unchanged TOAST value with no old row"))
                })?,
            };
        }
        if self.table.extra.is_some() {
            let extra_at = self.table.columns.len();
            let values = self.extras.iter().map(|(at, name, oid)| {
                let value = match &tuple[*at] {
                    Datum::Text(text) => extra_value(*oid, Some(text)),
                    Datum::Null => serde_json::Value::Null,
                    // An unchanged TOASTed value is in the old row's object.
                    Datum::Unchanged => old.and_then(|o| extra_field(&o[extra_at], name)).ok_or_else(|| {
                        TaskError::internal(format!("postgres_cdc: at {lsn}: column `{name}` is an unchanged TOAST value with no old row"))
                    })?,
                };
                Ok((name.as_str(), value))
            });
            let values: Vec<(&str, serde_json::Value)> = values.collect::<Result<_>>()?;
            row[extra_at] = extra_object(values.into_iter());
        }
        if self.table.versioned {
            row[self.table.version_at()] = Value::Int(version as i64);
        }
        Ok(row)
    }
}

fn value_error(column: &str, message: &str, place: &str) -> TaskError {
    TaskError::user(format!("postgres_cdc: column `{column}` in {place}: {message}; declare the column as VARCHAR to read it as text"))
}

#[cfg(test)]
mod tests {
    use super::super::pgoutput::fixtures::*;
    use super::*;

    /// Options naming a server nobody listens on: for what must not connect.
    fn offline_options() -> PostgresCdcOptions {
        PostgresCdcOptions {
            url: "postgres://nobody@127.0.0.1:1/none".into(),
            table: "t".into(),
            columns: "id BIGINT".into(),
            primary_key: vec!["id".into()],
            slot: "s".into(),
            publication: "p".into(),
            version_column: None,
            snapshot: true,
            existing_slot: ExistingSlot::Fail,
            heartbeat_interval: Duration::from_secs(1),
            max_slot_lag_bytes: None,
            snapshot_chunk_pages: 4096,
            schema_changes: SchemaChanges::Fail,
            extra_columns: None,
        }
    }

    fn fx_changes(versioned: bool) -> Changes {
        // Declared in another order than the table's, without `t`.
        let columns = [
            ("ts", DataType::Timestamp),
            ("id", DataType::Int),
            ("u", DataType::String),
            ("n", DataType::Int),
            ("j", DataType::String),
            ("b", DataType::Bool),
            ("m", DataType::Float),
        ];
        let table = Table {
            oid: 16390,
            schema: "public".into(),
            name: "fx".into(),
            qualified: "\"public\".\"fx\"".into(),
            columns: columns.iter().map(|(n, t)| (n.to_string(), *t)).collect(),
            present: vec![true; columns.len()],
            all: Vec::new(),
            extra: None,
            versioned,
        };
        Changes {
            table,
            relation: None,
            extras: Vec::new(),
            known: None,
            described: false,
            policy: SchemaChanges::Fail,
            start: Lsn(0x196_0000),
            floor: Lsn(0x196_0000),
            last: 0x196_0000,
            key: vec![1],
            reread_at: Lsn(0),
            touched: HashSet::new(),
        }
    }

    #[test]
    fn changes_become_an_upsert_changelog() {
        let mut changes = fx_changes(true);
        let mut batch = Batch::default();
        let lsn = Lsn(0x196_BA30);
        assert!(changes.on_message(&hex(FX_INSERT), lsn, &mut batch).is_err(), "a change before its relation");
        changes.on_message(&hex(FX_RELATION), Lsn(0), &mut batch).unwrap();
        changes.on_message(&hex(FX_INSERT), lsn, &mut batch).unwrap();
        changes.on_message(&hex(FX_UPDATE), Lsn(0x196_BB00), &mut batch).unwrap();
        let delete = hex(FX_DELETE);
        changes.on_message(&delete, Lsn(0x196_BC00), &mut batch).unwrap();
        // A change whose record is older (written before the consistent point, committed later) is
        // raised above the last version given out.
        changes.on_message(&hex(FX_INSERT), Lsn(0x10), &mut batch).unwrap();

        let s = |t: &str| Value::String(t.into());
        let row = |n: Value, version: u64| {
            vec![
                Value::Timestamp(1_714_566_896_789),
                Value::Int(1),
                s("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
                n,
                s("{\"a\": [1, 2]}"),
                Value::Bool(true),
                Value::Float(12.5),
                Value::Int(version as i64),
            ]
        };
        assert_eq!(batch.ops, [Op::Insert, Op::Retract, Op::Insert, Op::Retract, Op::Insert]);
        assert_eq!(
            batch.rows,
            [
                row(Value::Null, 0x196_BA30),
                row(Value::Null, 0x196_BB00),
                row(Value::Int(7), 0x196_BB00),
                row(Value::Int(7), 0x196_BC00),
                row(Value::Null, 0x196_BC01),
            ]
        );

        // Other tables' changes are not ours; a truncate is skipped.
        let mut other = Batch::default();
        changes.on_message(&hex(FY_RELATION), Lsn(0), &mut other).unwrap();
        changes.on_message(&fy_update(), Lsn(0x197_0000), &mut other).unwrap();
        changes.on_message(&hex(FY_TRUNCATE), Lsn(0x197_0000), &mut other).unwrap();
        assert!(other.is_empty());
    }

    #[test]
    fn changes_of_one_transaction_before_the_floor_get_distinct_versions() {
        // A transaction that began before the slot's consistent point updates a row twice and
        // commits after it: both records are below the floor, yet each version must be its own
        // (an idempotency key `id:version` would otherwise swallow the final one).
        let mut changes = fx_changes(true);
        let mut batch = Batch::default();
        changes.on_message(&hex(FX_RELATION), Lsn(0), &mut batch).unwrap();
        changes.on_message(&hex(FX_UPDATE), Lsn(0x100), &mut batch).unwrap();
        changes.on_message(&hex(FX_UPDATE), Lsn(0x180), &mut batch).unwrap();
        changes.on_message(&hex(FX_DELETE), Lsn(0x200), &mut batch).unwrap();
        let versions: Vec<i64> = batch
            .rows
            .iter()
            .map(|r| match r.last() {
                Some(Value::Int(v)) => *v,
                other => panic!("no version: {other:?}"),
            })
            .collect();
        let floor = 0x196_0000;
        assert_eq!(versions, [floor + 1, floor + 1, floor + 2, floor + 2, floor + 3]);

        // A replay from a checkpoint (the floor and the last version restored) repeats them.
        let mut again = fx_changes(true);
        again.last = (floor + 1) as u64;
        let mut replay = Batch::default();
        again.on_message(&hex(FX_RELATION), Lsn(0), &mut replay).unwrap();
        again.on_message(&hex(FX_UPDATE), Lsn(0x180), &mut replay).unwrap();
        again.on_message(&hex(FX_DELETE), Lsn(0x200), &mut replay).unwrap();
        assert_eq!(replay.rows, batch.rows[2..]);
    }

    #[test]
    fn checkpointed_positions_read_back_old_and_new() {
        let whole = |done: bool| ChunksDone { plan: ChunkPlan::whole(), done: if done { vec![0] } else { vec![] } };
        let v2 = PositionV2 { lsn: Lsn(0x50), floor: Lsn(0x10), version: 0x51, chunks: whole(true), columns: None };
        let p = Position::from(v2.clone());
        let restored = |inline: Vec<u8>| Position::restored(&RestoredState { inline, files: None }).unwrap();
        assert_eq!(restored(OperatorSnapshot::state(&p).inline), Some(p.clone()));
        // The layout before backfills.
        assert_eq!(restored(OperatorSnapshot::state(&v2).inline), Some(p.clone()));
        let point = Some(Point { at: 0x48, version: 0x50 });
        let backfills = vec![Backfill { id: 7, filter: "id < 3".into(), point }, Backfill { id: 8, filter: "true".into(), point: None }];
        let finished = vec![Finished { id: 6, outcome: "done rows=2 skipped=0".into() }];
        let with = Position { backfills, finished, ..p.clone() };
        assert_eq!(restored(OperatorSnapshot::state(&with).inline), Some(with));
        // The layout before chunks: the whole snapshot read or not.
        let v1 = PositionV1 { snapshot_done: false, lsn: Lsn(0x10), floor: Lsn(0x10), version: 0x10 };
        let expect = Position::from(PositionV2 { lsn: Lsn(0x10), floor: Lsn(0x10), version: 0x10, chunks: whole(false), columns: None });
        assert_eq!(restored(OperatorSnapshot::state(&v1).inline), Some(expect));
        // Before versioned state: a byte and little-endian words.
        let unversioned: Vec<u8> = [vec![1], [0x50u64, 0x10, 0x51].iter().flat_map(|w| w.to_le_bytes()).collect()].concat();
        assert_eq!(restored(unversioned.clone()), Some(p.clone()));
        // Written before the last version was kept: the position stands in for it.
        assert_eq!(restored(unversioned[..17].to_vec()), Some(Position { version: 0x50, ..p.clone() }));
        // With the word of an earlier way of re-reading after it, which raises the floor.
        let longer = [unversioned, 0x60u64.to_le_bytes().to_vec()].concat();
        assert_eq!(restored(longer), Some(Position { floor: Lsn(0x60), ..p }));
        assert_eq!(restored(Vec::new()), None, "a subtask that read nothing");
    }

    /// A restore takes the stream from subtask 0 and the chunks from every subtask.
    #[test]
    fn a_restore_gathers_every_subtasks_chunks() {
        let plan = ChunkPlan { relfilenode: 7, pages: 10, total: 3, estimated_rows: 100 };
        let state = |p: &Position| RestoredState { inline: OperatorSnapshot::state(p).inline, files: None };
        let stream = Position {
            lsn: Lsn(0x90),
            floor: Lsn(0x40),
            version: 0x95,
            chunks: ChunksDone { plan, done: vec![0, 2] },
            columns: Some(vec![("id".into(), 20)]),
            backfills: Vec::new(),
            finished: Vec::new(),
        };
        let share = Position { lsn: Lsn(0), chunks: ChunksDone { plan, done: vec![1] }, columns: None, ..stream.clone() };
        let restore = Some((4, vec![state(&share), RestoredState { inline: Vec::new(), files: None }, state(&stream)]));
        let (id, got) = Position::gather(&restore).unwrap().unwrap();
        assert_eq!((id, got.lsn, got.version), (4, Lsn(0x90), 0x95));
        assert!(got.chunks.complete(), "{:?}", got.chunks);
        let partial = Some((4, vec![state(&stream)]));
        let (_, got) = Position::gather(&partial).unwrap().unwrap();
        assert_eq!(got.chunks.remaining(), [1]);
        // The slot where the checkpoint left it: chunk 1 is read again, the stream goes on.
        let o = PostgresCdcOptions { snapshot_chunk_pages: 10, ..offline_options() };
        let schema = eddy_jobs::connectors::parse_columns(&o.columns).unwrap();
        let ctx = ConnectorContext::for_test(eddy_jobs::TaskId { vertex: 0, subtask: 0 }, 2, schema);
        let begin = Begin::decide(&o, &ctx, Some(Lsn(0x90)), Some((4, got.clone()))).unwrap();
        assert_eq!(begin, Begin::Reread { from: Lsn(0x90), floor: Lsn(0x40), version: 0x95, chunks: Some(got.chunks.clone()) });
        let e = Begin::decide(&o, &ctx, Some(Lsn(0x91)), Some((4, got))).unwrap_err().to_string();
        assert!(e.contains("dropped and created again"), "{e}");
    }

    #[test]
    fn unchanged_toast_comes_from_the_old_row() {
        let table = Table {
            oid: 16399,
            schema: "public".into(),
            name: "fy".into(),
            qualified: "\"public\".\"fy\"".into(),
            columns: vec![("id".into(), DataType::Int), ("big".into(), DataType::String), ("k".into(), DataType::Int)],
            present: vec![true; 3],
            all: Vec::new(),
            extra: None,
            versioned: false,
        };
        let mut changes = Changes {
            table,
            relation: None,
            extras: Vec::new(),
            known: None,
            described: false,
            policy: SchemaChanges::Fail,
            start: Lsn(0),
            floor: Lsn(0),
            last: 0,
            key: vec![0],
            reread_at: Lsn(0),
            touched: HashSet::new(),
        };
        let mut batch = Batch::default();
        changes.on_message(&hex(FY_RELATION), Lsn(0), &mut batch).unwrap();
        changes.on_message(&fy_update(), Lsn(0x197_1BC8), &mut batch).unwrap();
        let big = Value::String("x".repeat(3000).into());
        assert_eq!(batch.ops, [Op::Retract, Op::Insert]);
        assert_eq!(batch.rows, [vec![Value::Int(1), big.clone(), Value::Int(1)], vec![Value::Int(1), big, Value::Int(2)]]);
    }

    /// A declared name is the column spelled the same, or else one differing only in case; the
    /// other columns are undeclared (with `extra_columns`, carried).
    #[test]
    fn declared_columns_bind_by_exact_name_first() {
        let table = fx_changes(false).table;
        let bound = table.bind(["ID", "id", "U", "extra", "Ts"].into_iter());
        assert_eq!(bound, [None, Some(1), Some(2), None, Some(0)]);
    }

    #[test]
    fn relation_must_have_the_declared_columns_and_types() {
        let mut changes = fx_changes(false);
        changes.table.columns.push(("missing".into(), DataType::String));
        changes.table.present.push(true);
        let e = changes.on_message(&hex(FX_RELATION), Lsn(0), &mut Batch::default()).unwrap_err();
        assert_eq!(e.blame, crate::error::Blame::User);
        assert!(e.message.contains("`missing`"), "{}", e.message);

        let mut changes = fx_changes(false);
        changes.table.columns[0].1 = DataType::Int; // `ts` is a timestamptz
        let e = changes.on_message(&hex(FX_RELATION), Lsn(0), &mut Batch::default()).unwrap_err();
        assert_eq!(e.blame, crate::error::Blame::User);
        assert!(e.message.contains("declare it as TIMESTAMP"), "{}", e.message);
    }

    /// Past a new job's first attempt, subtasks other than 0 read nothing and idle (alive, no
    /// watermark held back).
    #[tokio::test]
    async fn only_subtask_zero_reads_after_a_restart() {
        let o = offline_options();
        let schema = eddy_jobs::connectors::parse_columns(&o.columns).unwrap();
        let mut ctx = ConnectorContext::for_test(eddy_jobs::TaskId { vertex: 0, subtask: 1 }, 2, schema);
        ctx.attempt = 2;
        let mut source = PostgresCdc::start(&o, ctx).await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(100), source.next_batch()).await.is_err(), "it idles");
        assert!(matches!(source.progress(), Progress::Watermark(w) if w > 0), "it holds no watermark back");
        assert_eq!(source.snapshot(1, std::path::Path::new("/nonexistent")).await.unwrap().inline, Vec::<u8>::new());
    }

    /// Tests against a real server. `EDDY_TEST_PG_URL` names a database on a PostgreSQL with
    /// `wal_level = logical`, as a user with REPLICATION (and the right to create schemas); each
    /// test works in its own schema, slot and publication and removes them.
    mod live {
        use std::collections::{BTreeMap, BTreeSet, HashMap};
        use std::path::Path;

        use tokio_postgres::NoTls;

        use super::*;

        const COLUMNS: &str = "id BIGINT, event_ts TIMESTAMP, content_id VARCHAR, user_id VARCHAR, event_type VARCHAR, \
                               duration_ms BIGINT, device VARCHAR, raw_payload VARCHAR, score DOUBLE, flagged BOOLEAN";
        /// The table's rows as the source should produce them (in `COLUMNS` order, without version).
        const EXPECTED: &str = "SELECT id, floor(extract(epoch FROM event_ts) * 1000)::int8, content_id::text, user_id::text, \
                                event_type, duration_ms::int8, device, raw_payload::text, score::float8, flagged \
                                FROM {t} ORDER BY id";

        fn url() -> Option<String> {
            crate::testing::service("EDDY_TEST_PG_URL", "postgres://user@host:port/db (wal_level = logical, REPLICATION)")
        }

        /// A schema of its own with the engagement table, and the test's slot and publication names.
        struct Db {
            client: Client,
            url: String,
            schema: String,
            slot: String,
            publication: String,
        }

        impl Db {
            async fn new(url: String) -> Db {
                let (client, connection) = tokio_postgres::connect(&url, NoTls).await.expect("connect to EDDY_TEST_PG_URL");
                tokio::spawn(connection);
                let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
                let db = Db {
                    client,
                    url,
                    schema: format!("cdc_{id}"),
                    slot: format!("eddy_test_{id}"),
                    publication: format!("eddy_test_{id}"),
                };
                db.exec(&format!(
                    "CREATE SCHEMA {s};
                     CREATE TABLE {s}.engagement_events (
                         id bigserial PRIMARY KEY,
                         content_id uuid,
                         user_id uuid,
                         event_type text CHECK (event_type IN ('play', 'pause', 'finish', 'click')),
                         event_ts timestamptz,
                         duration_ms int NULL,
                         device text,
                         raw_payload jsonb,
                         score numeric(12, 3),
                         flagged bool,
                         note text);
                     ALTER TABLE {s}.engagement_events REPLICA IDENTITY FULL;
                     ALTER TABLE {s}.engagement_events ALTER COLUMN raw_payload SET STORAGE EXTERNAL;
                     CREATE TABLE {s}.unpublished (id serial PRIMARY KEY, v text);",
                    s = db.schema
                ))
                .await;
                db
            }

            fn table(&self) -> String {
                format!("{}.engagement_events", self.schema)
            }

            async fn exec(&self, sql: &str) {
                self.client.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
            }

            async fn insert_rows(&self, from: i64, to: i64) {
                self.exec(&format!(
                    "INSERT INTO {t} (id, content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload, score, flagged, note)
                     SELECT g, gen_random_uuid(), gen_random_uuid(), (ARRAY['play', 'pause', 'finish', 'click'])[1 + g % 4],
                            timestamptz '2024-05-01 00:00:00+00' + g * interval '1.2345 second',
                            CASE WHEN g % 7 = 0 THEN NULL ELSE g * 10 END,
                            CASE WHEN g % 5 = 0 THEN NULL ELSE 'dévice-' || (g % 3) END,
                            jsonb_build_object('g', g, 'tags', jsonb_build_array('a', g % 2 = 0), 'q', 'say \"hi\"'),
                            CASE WHEN g % 11 = 0 THEN NULL ELSE g / 7.0 END,
                            CASE WHEN g % 13 = 0 THEN NULL ELSE g % 2 = 0 END,
                            'not read'
                     FROM generate_series({from}, {to}) g",
                    t = self.table()
                ))
                .await;
            }

            fn options(&self) -> PostgresCdcOptions {
                PostgresCdcOptions {
                    url: self.url.clone(),
                    table: self.table(),
                    columns: COLUMNS.into(),
                    primary_key: vec!["id".into()],
                    slot: self.slot.clone(),
                    publication: self.publication.clone(),
                    version_column: Some("lsn".into()),
                    snapshot: true,
                    existing_slot: ExistingSlot::Fail,
                    heartbeat_interval: Duration::from_secs(1),
                    max_slot_lag_bytes: None,
                    snapshot_chunk_pages: 4096,
                    schema_changes: SchemaChanges::Fail,
                    extra_columns: None,
                }
            }

            async fn start(&self, o: &PostgresCdcOptions) -> (Result<PostgresCdc>, Arc<TaskMetrics>) {
                self.start_with(o, |_| {}).await
            }

            /// Starts with a context changed by `edit` (attempt, checkpoints, restore).
            async fn start_with(
                &self,
                o: &PostgresCdcOptions,
                edit: impl FnOnce(&mut ConnectorContext),
            ) -> (Result<PostgresCdc>, Arc<TaskMetrics>) {
                let mut schema = eddy_jobs::connectors::parse_columns(&o.columns).unwrap();
                if let Some(e) = &o.extra_columns {
                    schema.fields.push(eddy_jobs::Field::new(e.clone(), DataType::String));
                }
                if let Some(v) = &o.version_column {
                    schema.fields.push(eddy_jobs::Field::new(v.clone(), DataType::Int));
                }
                let mut ctx = ConnectorContext::for_test(eddy_jobs::TaskId { vertex: 0, subtask: 0 }, 1, schema);
                edit(&mut ctx);
                let metrics = ctx.metrics.clone();
                (PostgresCdc::start(o, ctx).await, metrics)
            }

            async fn expected(&self) -> BTreeMap<i64, Row> {
                let rows = self.client.query(&EXPECTED.replace("{t}", &self.table()), &[]).await.unwrap();
                let text = |r: &tokio_postgres::Row, i| r.get::<_, Option<String>>(i).map_or(Value::Null, |t| Value::String(t.into()));
                rows.iter()
                    .map(|r| {
                        let row = vec![
                            Value::Int(r.get(0)),
                            Value::Timestamp(r.get(1)),
                            text(r, 2),
                            text(r, 3),
                            text(r, 4),
                            r.get::<_, Option<i64>>(5).map_or(Value::Null, Value::Int),
                            text(r, 6),
                            text(r, 7),
                            r.get::<_, Option<f64>>(8).map_or(Value::Null, Value::Float),
                            r.get::<_, Option<bool>>(9).map_or(Value::Null, Value::Bool),
                        ];
                        (r.get(0), row)
                    })
                    .collect()
            }

            /// The slot's `confirmed_flush_lsn`, if the slot exists.
            async fn confirmed(&self) -> Option<u64> {
                let row = self
                    .client
                    .query_opt("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&self.slot])
                    .await
                    .unwrap()?;
                Some(Lsn::parse(&row.get::<_, String>(0)).unwrap().0)
            }

            async fn wal_now(&self) -> u64 {
                let row = self.client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap();
                Lsn::parse(&row.get::<_, String>(0)).unwrap().0
            }

            async fn drop_all(&self) {
                self.drop_slot().await;
                self.exec(&format!("DROP PUBLICATION IF EXISTS {}; DROP SCHEMA {} CASCADE", self.publication, self.schema)).await;
            }

            /// Drops the slot once the walsender that read it is gone.
            async fn drop_slot(&self) {
                for _ in 0..100 {
                    let gone = self
                        .client
                        .execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", &[&self.slot])
                        .await;
                    if gone.is_ok() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }

        /// What a test keeps of the changelog it is handed.
        trait Apply {
            fn apply(&mut self, batch: &Batch);
            fn rows(&self) -> &BTreeMap<i64, Row>;
        }

        /// The changelog applied to a map by id, checking each retraction removes exactly the row
        /// it names and versions never go down per id.
        #[derive(Default)]
        struct Applied {
            rows: BTreeMap<i64, Row>,
            versions: HashMap<i64, i64>,
            changes: usize,
        }

        impl Apply for Applied {
            fn rows(&self) -> &BTreeMap<i64, Row> {
                &self.rows
            }

            fn apply(&mut self, batch: &Batch) {
                assert_eq!(batch.rows.len(), batch.ops.len());
                for (i, (row, op)) in batch.rows.iter().zip(&batch.ops).enumerate() {
                    assert_eq!(row.len(), 11, "ten columns and the version");
                    let (Value::Int(id), Value::Int(version)) = (&row[0], &row[10]) else { panic!("bad row {row:?}") };
                    let last = self.versions.entry(*id).or_insert(i64::MIN);
                    assert!(*version >= *last, "id {id}: version {version} after {last}");
                    *last = *version;
                    match op {
                        Op::Insert => {
                            self.rows.insert(*id, row[..10].to_vec());
                        }
                        Op::Retract => {
                            let had = self.rows.remove(id);
                            assert_eq!(had.as_deref(), Some(&row[..10]), "retraction of id {id} is not the row it replaces");
                            if let Some(Op::Insert) = batch.ops.get(i + 1) {
                                // An update's new row follows in the same batch (its id may differ).
                            }
                        }
                    }
                    self.changes += 1;
                }
            }
        }

        /// The changelog as an upsert topic and its consumer see it (what the ingest job's Kafka
        /// sink and the process job's upsert source make of it): per batch, the last change of each
        /// id; per id, a change only if its version is above the one held (a delete's too), and
        /// only passed on if it changes more than the version.
        #[derive(Default)]
        struct Upserted {
            rows: BTreeMap<i64, Row>,
            versions: HashMap<i64, i64>,
            /// Every (id, version, insert?) passed on, in order.
            taken: Vec<(i64, i64, bool)>,
            /// The version each live id was last passed on with.
            delivered: HashMap<i64, i64>,
            /// Every version each id was inserted with, passed on or not (what a consumer that
            /// no longer holds the id's version, its state expired, passes on).
            inserted: HashMap<i64, BTreeSet<i64>>,
        }

        impl Apply for Upserted {
            fn rows(&self) -> &BTreeMap<i64, Row> {
                &self.rows
            }

            fn apply(&mut self, batch: &Batch) {
                let mut last: BTreeMap<i64, usize> = BTreeMap::new();
                for (i, row) in batch.rows.iter().enumerate() {
                    let Value::Int(id) = row[0] else { panic!("bad row {row:?}") };
                    last.insert(id, i);
                    if let (Op::Insert, Value::Int(version)) = (batch.ops[i], &row[10]) {
                        self.inserted.entry(id).or_default().insert(*version);
                    }
                }
                let mut order: Vec<usize> = last.into_values().collect();
                order.sort_unstable();
                for i in order {
                    let (row, op) = (&batch.rows[i], batch.ops[i]);
                    let (Value::Int(id), Value::Int(version)) = (&row[0], &row[10]) else { panic!("bad row {row:?}") };
                    if self.versions.get(id).is_some_and(|held| version <= held) {
                        continue;
                    }
                    self.versions.insert(*id, *version);
                    if op == Op::Insert && self.rows.get(id).is_some_and(|r| r[..] == row[..10]) {
                        continue; // only the version changed
                    }
                    self.taken.push((*id, *version, op == Op::Insert));
                    match op {
                        Op::Insert => {
                            self.rows.insert(*id, row[..10].to_vec());
                            self.delivered.insert(*id, *version);
                        }
                        Op::Retract => {
                            self.rows.remove(id);
                            self.delivered.remove(id);
                        }
                    };
                }
            }
        }

        /// One round of the task loop: a batch if one comes soon, then `handed_on` and `tick`.
        async fn step(source: &mut PostgresCdc, applied: &mut impl Apply) -> usize {
            let mut rows = 0;
            if let Ok(next) = tokio::time::timeout(Duration::from_millis(50), source.next_batch()).await {
                let batch = next.unwrap_or_else(|e| panic!("next_batch: {e}")).expect("the stream does not end");
                assert!(!batch.is_empty());
                rows = batch.len();
                applied.apply(&batch);
                source.handed_on().await.unwrap();
            }
            source.handed_on().await.unwrap();
            source.tick().await.unwrap();
            rows
        }

        /// Drives the source until the map equals the table.
        async fn catch_up(db: &Db, source: &mut PostgresCdc, applied: &mut impl Apply) {
            let expected = db.expected().await;
            let deadline = Instant::now() + Duration::from_secs(60);
            while *applied.rows() != expected {
                assert!(Instant::now() < deadline, "did not catch up: {}", describe_difference(applied.rows(), &expected));
                step(source, applied).await;
            }
        }

        fn describe_difference(got: &BTreeMap<i64, Row>, want: &BTreeMap<i64, Row>) -> String {
            let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(k)).take(5).collect();
            let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(k)).take(5).collect();
            let differ: Vec<_> = want.iter().filter(|(k, v)| got.get(k).is_some_and(|g| g != *v)).take(2).collect();
            let differ: Vec<_> = differ.iter().map(|(k, v)| format!("{k}: want {v:?}, got {:?}", got[k])).collect();
            format!("{} rows vs {}; missing {missing:?}; extra {extra:?}; differ {differ:?}", got.len(), want.len())
        }

        /// Inserts (ids from `new_ids`), updates (including TOASTed values and primary keys), deletes
        /// and multi-statement transactions on ids up to `max_id`: `rounds` of them, and more until
        /// `until` is set, if given.
        async fn write_changes(
            url: String,
            table: String,
            rounds: u64,
            mut seed: u64,
            max_id: i64,
            new_ids: i64,
            until: Option<Arc<AtomicBool>>,
        ) {
            let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
            tokio::spawn(connection);
            let schema = table.rsplit_once('.').map_or("public", |(s, _)| s).to_string();
            let mut next_id = new_ids;
            let more = || until.as_ref().is_some_and(|u| !u.load(Ordering::SeqCst));
            let mut round = 0;
            while round < rounds || more() {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let x = 1 + (seed >> 33) as i64 % max_id;
                let sql = match round % 9 {
                    0 => {
                        next_id += 1;
                        format!(
                            "INSERT INTO {table} (id, content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload, score, flagged) \
                             VALUES ({next_id}, gen_random_uuid(), NULL, 'click', now(), NULL, 'tv', '{{\"new\": true}}', 0.125, NULL)"
                        )
                    }
                    1 => format!("UPDATE {table} SET duration_ms = coalesce(duration_ms, 0) + 1, raw_payload = raw_payload || '{{\"u\": 1}}' WHERE id = {x}"),
                    2 => format!("DELETE FROM {table} WHERE id = {x}"),
                    3 => {
                        next_id += 1;
                        format!(
                            "BEGIN;
                             UPDATE {table} SET duration_ms = 5 WHERE id = {x};
                             UPDATE {table} SET device = 'phone', event_type = 'finish' WHERE id = {x};
                             INSERT INTO {table} (id, event_type, event_ts) VALUES ({next_id}, 'play', '2024-01-01 00:00:00.001+03');
                             DELETE FROM {table} WHERE id = {} ;
                             COMMIT;",
                            x / 2 + 1
                        )
                    }
                    4 => format!("UPDATE {table} SET event_ts = now(), flagged = NOT flagged, score = score + 0.5 WHERE id = {x}"),
                    5 => format!(
                        "UPDATE {table} SET raw_payload = jsonb_build_object('big', (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 120))) WHERE id = {x};
                         UPDATE {table} SET duration_ms = 42 WHERE id = {x};"
                    ),
                    6 => format!("UPDATE {table} SET duration_ms = NULL, user_id = gen_random_uuid() WHERE id BETWEEN {x} AND {x} + 20"),
                    7 => format!("UPDATE {table} SET id = id + 1000000 WHERE id = {x}"),
                    _ => format!("INSERT INTO {schema}.unpublished (v) VALUES ('noise {round}')"),
                };
                client.batch_execute(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
                round += 1;
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn snapshot_then_stream_equals_the_table() {
            let Some(url) = url() else { return };
            let db = Db::new(url).await;
            const INITIAL: i64 = 20_000;
            db.insert_rows(1, INITIAL).await;
            let o = db.options();
            // Changes all along: while the slot is created and its snapshot exported and imported
            // (each lands on exactly one side of the consistent point), and while the snapshot is
            // read (the consumer is slow then).
            // It goes on until half the snapshot is handed on, however slow the machine.
            let stop = Arc::new(AtomicBool::new(false));
            let writer = tokio::spawn(write_changes(db.url.clone(), db.table(), 2000, 7, INITIAL, 100_000, Some(stop.clone())));
            tokio::time::sleep(Duration::from_millis(50)).await;
            let (source, metrics) = db.start(&o).await;
            let mut source = source.unwrap_or_else(|e| panic!("start: {e}"));
            let created_at = db.confirmed().await.expect("the slot was created");
            let mut applied = Applied::default();
            let mut snapshot_batches = 0;
            while applied.rows.len() < INITIAL as usize / 2 {
                if step(&mut source, &mut applied).await > 0 {
                    snapshot_batches += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            assert!(!writer.is_finished(), "the writer runs while the snapshot is read");
            stop.store(true, Ordering::SeqCst);
            assert!(snapshot_batches >= 9, "batches of at most about 1024 rows");
            writer.await.unwrap();
            catch_up(&db, &mut source, &mut applied).await;
            let gauges = metrics.gauges();
            let done = gauges["snapshot_rows_done"];
            assert_eq!(gauges.get("snapshot_rows_total"), Some(&done));
            assert!(done >= INITIAL - 300, "{done} snapshot rows");
            assert!(applied.changes > INITIAL as usize + 1000, "{} changes", applied.changes);

            // What was handed on is confirmed to the slot, up to the server's WAL end.
            let wal = db.wal_now().await;
            let deadline = Instant::now() + Duration::from_secs(20);
            while db.confirmed().await.unwrap() < wal {
                assert!(Instant::now() < deadline, "slot stuck at {:x} below {wal:x}", db.confirmed().await.unwrap());
                step(&mut source, &mut applied).await;
            }
            assert!(db.confirmed().await.unwrap() > created_at);
            assert!(*metrics.gauges().get("confirmed_lsn").unwrap() as u64 >= wal);

            // An idle table does not hold WAL back: writes elsewhere advance the slot too.
            for i in 0..20 {
                db.exec(&format!("INSERT INTO {}.unpublished (v) VALUES ('idle {i}')", db.schema)).await;
            }
            let wal = db.wal_now().await;
            let deadline = Instant::now() + Duration::from_secs(20);
            while db.confirmed().await.unwrap() < wal {
                assert!(Instant::now() < deadline, "idle slot stuck at {:x} below {wal:x}", db.confirmed().await.unwrap());
                assert_eq!(step(&mut source, &mut applied).await, 0, "unpublished tables bring no rows");
            }
            let lag_deadline = Instant::now() + Duration::from_secs(5);
            while !metrics.gauges().contains_key("slot_lag_bytes") {
                assert!(Instant::now() < lag_deadline, "no slot_lag_bytes gauge");
                step(&mut source, &mut applied).await;
            }

            // A restart (of a job without checkpoints) resumes from the slot without a snapshot;
            // changes made meanwhile arrive.
            drop(source);
            write_changes(db.url.clone(), db.table(), 90, 99, INITIAL, 200_000, None).await;
            let (source, metrics) = db.start_with(&o, |ctx| ctx.attempt = 2).await;
            let mut source = source.unwrap_or_else(|e| panic!("restart: {e}"));
            catch_up(&db, &mut source, &mut applied).await;
            assert_eq!(metrics.gauges().get("snapshot_rows_total"), Some(&0));
            drop(source);
            db.drop_all().await;
        }

        /// A slot held back past `max_slot_lag_bytes` (here: changes read but never handed on, as
        /// when checkpoints stop completing) fails the source with the slot and its lag named, as a
        /// fault of the job's that a restart would not mend.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_slot_past_its_lag_bound_fails_the_job_with_the_lag_named() {
            let Some(url) = url() else { return };
            let db = Db::new(url).await;
            let bound = 256 * 1024;
            let (source, metrics) = db.start(&PostgresCdcOptions { max_slot_lag_bytes: Some(bound), ..db.options() }).await;
            let mut source = source.unwrap();
            let mut applied = Applied::default();
            while source.snapshot_handed_on.is_some() || !source.snapshot_returned {
                step(&mut source, &mut applied).await;
            }
            // About 2 MB of WAL, read but never said to be handed on: the slot cannot move.
            let mut next = 1;
            let deadline = Instant::now() + Duration::from_secs(60);
            let error = loop {
                assert!(Instant::now() < deadline, "no failure; slot_lag_bytes = {:?}", metrics.gauges().get("slot_lag_bytes"));
                if next <= 6_000 {
                    db.insert_rows(next, next + 999).await;
                    next += 1_000;
                }
                if let Ok(batch) = tokio::time::timeout(Duration::from_millis(50), source.next_batch()).await {
                    applied.apply(&batch.unwrap().unwrap());
                }
                if let Err(e) = source.tick().await {
                    break e;
                }
            };
            assert_eq!(error.blame, crate::error::Blame::User, "{error}");
            assert!(!error.retryable(), "{error}");
            for named in [db.slot.as_str(), "max_slot_lag_bytes = 262144", "bytes of WAL"] {
                assert!(error.message.contains(named), "{named} is not in: {}", error.message);
            }
            let lag: u64 = error.message.split(" holds ").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
            assert!(lag > bound, "failed at a lag of {lag}, under the bound {bound}");
            drop(source);
            db.drop_all().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn confirms_only_what_was_handed_on() {
            let Some(url) = url() else { return };
            let db = Db::new(url).await;
            db.insert_rows(1, 100).await;
            let (source, _) = db.start(&db.options()).await;
            let mut source = source.unwrap();
            let created_at = db.confirmed().await.unwrap();
            let mut applied = Applied::default();
            catch_up(&db, &mut source, &mut applied).await;
            while source.snapshot_handed_on.is_some() || !source.snapshot_returned {
                step(&mut source, &mut applied).await;
            }

            // Read every change, but never say it was handed on.
            for id in 1..=50 {
                db.exec(&format!("UPDATE {} SET duration_ms = -1 WHERE id = {id}", db.table())).await;
            }
            let expected = db.expected().await;
            while applied.rows != expected {
                let batch = tokio::time::timeout(Duration::from_secs(10), source.next_batch()).await.unwrap().unwrap().unwrap();
                applied.apply(&batch);
                source.tick().await.unwrap();
            }
            tokio::time::sleep(STATUS_INTERVAL * 3).await;
            assert_eq!(db.confirmed().await, Some(created_at), "confirmed before being handed on");

            // Once handed on, it is confirmed.
            let wal = db.wal_now().await;
            let deadline = Instant::now() + Duration::from_secs(20);
            while db.confirmed().await.unwrap() < wal {
                assert!(Instant::now() < deadline, "slot stuck below {wal:x}");
                step(&mut source, &mut applied).await;
            }
            drop(source);
            db.drop_all().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn without_snapshot_only_changes_arrive() {
            let Some(url) = url() else { return };
            let db = Db::new(url).await;
            db.insert_rows(1, 10).await;
            let (source, metrics) = db.start(&PostgresCdcOptions { snapshot: false, ..db.options() }).await;
            let mut source = source.unwrap();
            db.insert_rows(11, 15).await;
            db.exec(&format!("DELETE FROM {} WHERE id = 12", db.table())).await;
            let mut applied = Applied::default();
            let deadline = Instant::now() + Duration::from_secs(20);
            while applied.rows.keys().copied().collect::<Vec<_>>() != [11, 13, 14, 15] {
                assert!(Instant::now() < deadline, "got ids {:?}", applied.rows.keys());
                step(&mut source, &mut applied).await;
            }
            assert_eq!(metrics.gauges().get("snapshot_rows_total"), Some(&0));
            drop(source);
            db.drop_all().await;
        }

        /// With event time, the source carries PostgreSQL's clock through the WAL: on a quiet table
        /// its progress follows the server's clock, and a clock reaches it only after every change
        /// committed before it.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn the_database_clock_moves_the_watermark_and_never_overtakes_a_change() {
            let Some(url) = url() else { return };
            let db = Db::new(url).await;
            db.insert_rows(1, 10).await;
            let o = PostgresCdcOptions { heartbeat_interval: Duration::from_millis(100), ..db.options() };
            let (source, _) = db
                .start_with(&o, |ctx| {
                    ctx.event_time = Some(eddy_jobs::plan::EventTime { column: 1, allowed_delay_ms: 0, idle_timeout_ms: 5_000 })
                })
                .await;
            let mut source = source.unwrap();
            assert_eq!(source.progress(), Progress::Waiting);
            let server_ms = async || -> i64 {
                let row = db.client.query_one("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint", &[]).await.unwrap();
                row.get(0)
            };
            let mut applied = Applied::default();
            // Reads until the clock passes `t`; returns the ids read by then.
            let mut read_until = async |source: &mut PostgresCdc, t: i64| {
                let deadline = Instant::now() + Duration::from_secs(20);
                while !matches!(source.progress(), Progress::Clock(c) if c >= t) {
                    assert!(Instant::now() < deadline, "progress {:?}, wanted a clock past {t}", source.progress());
                    if let Ok(next) = tokio::time::timeout(Duration::from_millis(50), source.next_batch()).await {
                        applied.apply(&next.unwrap().unwrap());
                    }
                    source.handed_on().await.unwrap();
                }
                applied.rows.keys().copied().collect::<Vec<_>>()
            };
            let quiet = server_ms().await;
            assert_eq!(read_until(&mut source, quiet).await, (1..=10).collect::<Vec<_>>(), "the snapshot comes first");
            db.insert_rows(11, 15).await;
            let after = server_ms().await;
            assert_eq!(read_until(&mut source, after).await, (1..=15).collect::<Vec<_>>(), "changes before the clock");
            drop(source);
            db.drop_all().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn cancelled_snapshot_drops_the_new_slot() {
            let Some(url) = url() else { return };
            let db = Db::new(url).await;
            db.insert_rows(1, 10_000).await;
            let (source, _) = db.start(&db.options()).await;
            let mut source = source.unwrap();
            let mut applied = Applied::default();
            while applied.rows.is_empty() {
                step(&mut source, &mut applied).await;
            }
            assert!(db.confirmed().await.is_some());
            drop(source);
            let deadline = Instant::now() + Duration::from_secs(20);
            while db.confirmed().await.is_some() {
                assert!(Instant::now() < deadline, "the half-read slot is still there");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // The next start takes a whole snapshot again.
            let (source, metrics) = db.start(&db.options()).await;
            let mut source = source.unwrap();
            let mut applied = Applied::default();
            catch_up(&db, &mut source, &mut applied).await;
            assert_eq!(metrics.gauges().get("snapshot_rows_done"), Some(&10_000));
            drop(source);
            db.drop_all().await;
        }

        /// A checkpoint's state of the source, as a restore hands it back.
        fn restore_of(id: u64, state: &OperatorSnapshot) -> Option<(u64, Vec<crate::operator::RestoredState>)> {
            Some((id, vec![crate::operator::RestoredState { inline: state.inline.clone(), files: None }]))
        }

        async fn wait_slot(db: &Db, what: &str, ok: impl Fn(Option<u64>) -> bool) {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !ok(db.confirmed().await) {
                assert!(Instant::now() < deadline, "{what}: slot at {:?}", db.confirmed().await);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_worker_lost_during_the_snapshot_resends_no_new_versions_and_misses_no_delete() {
            let Some(url) = url() else { return };
            let db = Db::new(url).await;
            db.insert_rows(1, 20_000).await;
            let o = db.options();
            let checkpointed = |attempt: u64| {
                move |ctx: &mut ConnectorContext| {
                    ctx.checkpointing = true;
                    ctx.attempt = attempt;
                }
            };
            let (source, _) = db.start_with(&o, checkpointed(1)).await;
            let mut source = source.unwrap();
            let mut topic = Upserted::default();
            while topic.rows.len() < 3_000 {
                step(&mut source, &mut topic).await;
            }
            let created_at = db.confirmed().await.expect("the slot was created");
            // The task dies before any checkpoint completes (the reader's session ends with it).
            drop(source);
            let first = topic.delivered.clone();
            let delivered: Vec<i64> = first.keys().copied().filter(|id| *id > 10).take(3).collect();
            let changed = [delivered[0], delivered[1], delivered[2], 19_990, 19_991, 19_992];
            db.exec(&format!(
                "DELETE FROM {t} WHERE id IN ({a}, 19990);
                 UPDATE {t} SET duration_ms = -1 WHERE id IN ({b}, 19991);
                 UPDATE {t} SET id = 30000 WHERE id IN ({c});
                 DELETE FROM {t} WHERE id = 19992;
                 INSERT INTO {t} (id, event_type, event_ts) VALUES (40000, 'play', now());
                 INSERT INTO {t} (id, event_type, event_ts) VALUES (40001, 'play', now());
                 INSERT INTO {t} (id, event_type, event_ts) SELECT g, 'play', now() FROM generate_series(50000, 51100) g;
                 UPDATE {t} SET duration_ms = 2 WHERE id = 40001;",
                t = db.table(),
                a = changed[0],
                b = changed[1],
                c = changed[2]
            ))
            .await;

            // The restart finds the slot where it was created, and reads the table again under it.
            let (source, metrics) = db.start_with(&o, checkpointed(2)).await;
            let mut source = source.unwrap();
            assert_eq!(db.confirmed().await, Some(created_at), "the slot was kept");
            catch_up(&db, &mut source, &mut topic).await;
            assert_eq!(metrics.gauges().get("snapshot_rows_done"), Some(&(19_999 + 1_101)));
            // Inserted and updated while down (more than a batch of rows in between, so that the
            // two changes reach downstream in different batches): it comes from the stream only,
            // as its two changes, as an undisturbed run sends it; never again from the re-read
            // table, whose rows carry the slot's point `created_at`.
            let versions: Vec<i64> = topic.inserted[&40_001].iter().copied().collect();
            assert_eq!(versions.len(), 2, "insert and update, nothing more: {versions:?}");
            assert!(versions.iter().all(|v| *v as u64 > created_at), "{versions:?} vs the slot at {created_at:x}");
            assert_eq!(topic.delivered.get(&40_001), versions.last(), "the update is what stays");
            let taken: Vec<_> = topic.taken.iter().filter(|t| t.0 == 40_001).collect();
            assert!(!taken.is_empty() && taken.iter().all(|t| t.2 && versions.contains(&t.1)), "{taken:?}");
            // Rows delivered the first time and untouched since were not passed on again.
            for (id, version) in &first {
                if !changed.contains(id) {
                    assert_eq!(topic.delivered.get(id), Some(version), "id {id} was sent again");
                }
            }
            assert_eq!(first.values().collect::<std::collections::HashSet<_>>().len(), 1, "one snapshot version");
            // Nor under a new version, even to a consumer that forgot the old one: every row
            // untouched since the first snapshot, read then or not, came under that snapshot's
            // version only.
            let snapshot_version = *first.values().next().unwrap();
            for (id, versions) in &topic.inserted {
                if !changed.contains(id) && *id < 30_000 {
                    assert_eq!(versions.iter().copied().collect::<Vec<_>>(), [snapshot_version], "id {id}");
                }
            }
            assert_eq!(topic.inserted.len(), 20_001 + 1_101, "every row of the table, and the ones inserted while down");
            drop(source);
            db.drop_all().await;
        }

        /// Two subtasks share a new job's snapshot out by chunks; both die after a checkpoint
        /// that holds some chunks of each (and a stream position past the snapshot's point), while
        /// rows are deleted, updated and inserted; the restore reads only the chunks no checkpoint
        /// holds, on subtask 0 (subtask 1 idles), and every row ends up once, as the table has it.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_kill_during_a_parallel_snapshot_resumes_by_chunks_without_losing_or_repeating_a_row() {
            let Some(url) = url() else { return };
            let db = Db::new(url).await;
            db.insert_rows(1, 20_000).await;
            let o = PostgresCdcOptions { snapshot_chunk_pages: 16, ..db.options() };
            let subtask = |subtask: u32, attempt: u64, restore: Option<(u64, Vec<RestoredState>)>| {
                move |ctx: &mut ConnectorContext| {
                    ctx.task = eddy_jobs::TaskId { vertex: 0, subtask };
                    ctx.parallelism = 2;
                    ctx.checkpointing = true;
                    ctx.attempt = attempt;
                    ctx.restore = restore;
                }
            };
            let ((first, m0), (second, m1)) = tokio::join!(db.start_with(&o, subtask(0, 1, None)), db.start_with(&o, subtask(1, 1, None)));
            let (mut first, mut second) = (first.unwrap(), second.unwrap());
            let mut topic = Upserted::default();
            let chunks_of = |m: &Arc<TaskMetrics>| m.gauges().get("snapshot_chunks_done").copied().unwrap_or(0);
            let deadline = Instant::now() + Duration::from_secs(60);
            while chunks_of(&m0) < 3 || chunks_of(&m1) < 3 {
                assert!(Instant::now() < deadline, "both subtasks read chunks: {:?} {:?}", m0.gauges(), m1.gauges());
                step(&mut first, &mut topic).await;
                step(&mut second, &mut topic).await;
            }
            let total = m0.gauges()["snapshot_chunks_total"] + m1.gauges()["snapshot_chunks_total"];
            let tmp = std::path::Path::new("/nonexistent");
            let states = vec![first.snapshot(1, tmp).await.unwrap(), second.snapshot(1, tmp).await.unwrap()];
            first.checkpoint_complete(1).await.unwrap();
            second.checkpoint_complete(1).await.unwrap();
            // More is handed on after the checkpoint, then both die.
            for _ in 0..5 {
                step(&mut first, &mut topic).await;
                step(&mut second, &mut topic).await;
            }
            drop((first, second));
            let first_versions: HashSet<i64> = topic.delivered.values().copied().collect();
            assert_eq!(first_versions.len(), 1, "one snapshot version: {first_versions:?}");
            let delivered: Vec<i64> = topic.delivered.keys().copied().filter(|id| *id > 10).take(2).collect();
            let undelivered: Vec<i64> = (11..20_000).filter(|id| !topic.delivered.contains_key(id)).take(2).collect();
            assert_eq!(undelivered.len(), 2, "some rows were still to read when the subtasks died");
            db.exec(&format!(
                "DELETE FROM {t} WHERE id IN ({d0}, {u0});
                 UPDATE {t} SET duration_ms = -1, note = 'moved' WHERE id IN ({d1}, {u1});
                 INSERT INTO {t} (id, event_type, event_ts) SELECT g, 'play', now() FROM generate_series(50000, 50100) g;",
                t = db.table(),
                d0 = delivered[0],
                u0 = undelivered[0],
                d1 = delivered[1],
                u1 = undelivered[1],
            ))
            .await;

            let restore = |states: &[OperatorSnapshot]| {
                Some((1, states.iter().map(|s| RestoredState { inline: s.inline.clone(), files: None }).collect()))
            };
            let ((first, m0), (second, _)) =
                tokio::join!(db.start_with(&o, subtask(0, 2, restore(&states))), db.start_with(&o, subtask(1, 2, restore(&states))));
            let (mut first, mut second) = (first.unwrap(), second.unwrap());
            assert!(tokio::time::timeout(Duration::from_millis(200), second.next_batch()).await.is_err(), "subtask 1 idles");
            assert!(matches!(second.progress(), Progress::Watermark(_)), "subtask 1 holds no watermark back");
            catch_up(&db, &mut first, &mut topic).await;
            let reread = m0.gauges()["snapshot_chunks_total"];
            assert!(reread > 0 && reread < total, "only the chunks no checkpoint holds are read again: {reread} of {total}");
            assert!(m0.gauges()["snapshot_rows_done"] < 20_000, "{:?}", m0.gauges());
            // Rows untouched since the snapshot came under its version only, whichever run read them.
            let snapshot_version = *first_versions.iter().next().unwrap();
            let changed = [delivered[0], delivered[1], undelivered[0], undelivered[1]];
            for (id, versions) in &topic.inserted {
                if !changed.contains(id) && *id < 50_000 {
                    assert_eq!(versions.iter().copied().collect::<Vec<_>>(), [snapshot_version], "id {id}");
                }
            }
            assert_eq!(topic.inserted.len(), 20_000 + 101 - 1, "every row, and those inserted while down (one deleted unread)");
            drop((first, second));
            db.drop_all().await;
        }

        /// Drives the source until `done` holds of it, for a minute at most.
        async fn until(source: &mut PostgresCdc, topic: &mut Upserted, what: &str, done: impl Fn(&PostgresCdc) -> bool) {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !done(source) {
                assert!(Instant::now() < deadline, "{what}: {:?} {:?}", source.metrics.gauges(), source.metrics.notes());
                step(source, topic).await;
            }
        }

        /// `eddy backfill`: the rows a condition selects go out again under one version, above
        /// every change before the backfill's point and below every change after; a crash once a
        /// checkpoint holds the point reads them again under that version, skipping rows changed
        /// meanwhile; a condition that fails says why and the stream carries on; a repeated
        /// order is ignored.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_backfill_sits_between_the_changes_around_it_and_survives_a_crash() {
            let Some(url) = url() else { return };
            let db = Db::new(url).await;
            db.insert_rows(1, 300).await;
            let o = db.options();
            let checkpointing = |attempt: u64, restore: Option<(u64, Vec<RestoredState>)>| {
                move |ctx: &mut ConnectorContext| {
                    ctx.checkpointing = true;
                    ctx.attempt = attempt;
                    ctx.restore = restore;
                }
            };
            let (source, _) = db.start_with(&o, checkpointing(1, None)).await;
            let mut source = source.unwrap();
            let mut topic = Upserted::default();
            let tmp = Path::new("/nonexistent");
            let t = db.table();
            db.exec(&format!("UPDATE {t} SET duration_ms = -12 WHERE id = 12")).await;
            catch_up(&db, &mut source, &mut topic).await;
            let before = topic.versions[&12];

            // Taken before checkpoint 1's barrier; at its point, checkpoint 2 holds it.
            source.order(SourceOrder::Backfill { id: 1, filter: "id BETWEEN 10 AND 20".into() }).await.unwrap();
            source.snapshot(1, tmp).await.unwrap();
            until(&mut source, &mut topic, "backfill 1 reaches its point", |s| s.point_held.is_some()).await;
            let point = source.backfills[0].point.expect("the point is the source's");
            db.exec(&format!("UPDATE {t} SET duration_ms = -15 WHERE id = 15")).await;
            source.snapshot(2, tmp).await.unwrap();
            source.checkpoint_complete(2).await.unwrap();
            let gauge = |s: &PostgresCdc, name: &str| s.metrics.gauges().get(name).copied().unwrap_or(0);
            until(&mut source, &mut topic, "backfill 1 is handed on", |s| gauge(s, "backfill_done_id") == 1).await;
            catch_up(&db, &mut source, &mut topic).await;
            assert!(point.version as i64 > before, "above the change before it: {point:?} vs {before}");
            for id in 10..=20 {
                assert!(topic.inserted[&id].contains(&(point.version as i64)), "id {id} went out again under {point:?}");
            }
            assert!(topic.versions[&15] > point.version as i64, "the change after it outranks it");
            assert_eq!(gauge(&source, "backfill_rows") + gauge(&source, "backfill_rows_skipped"), 11);

            // Backfill 2 dies after checkpoint 4 held its point; rows change while it is down.
            source.order(SourceOrder::Backfill { id: 2, filter: "id BETWEEN 30 AND 40".into() }).await.unwrap();
            source.snapshot(3, tmp).await.unwrap();
            until(&mut source, &mut topic, "backfill 2 reaches its point", |s| s.point_held.is_some()).await;
            let state = source.snapshot(4, tmp).await.unwrap();
            source.checkpoint_complete(4).await.unwrap();
            drop(source);
            db.exec(&format!("UPDATE {t} SET duration_ms = -35 WHERE id = 35; DELETE FROM {t} WHERE id = 36")).await;
            let restored = RestoredState { inline: state.inline.clone(), files: None };
            let held = restored.state::<Position>().unwrap().unwrap();
            let point = held.backfills[0].point.expect("checkpoint 4 holds the point");
            let (source, _) = db.start_with(&o, checkpointing(2, Some((4, vec![restored])))).await;
            let mut source = source.unwrap();
            until(&mut source, &mut topic, "backfill 2 is handed on after the crash", |s| gauge(s, "backfill_done_id") == 2).await;
            catch_up(&db, &mut source, &mut topic).await;
            for id in (30..=40).filter(|id| ![35, 36].contains(id)) {
                assert!(topic.inserted[&id].contains(&(point.version as i64)), "id {id} went out under {point:?}");
            }
            assert!(topic.versions[&35] > point.version as i64, "the change made while down outranks the backfill");
            assert_eq!(gauge(&source, "backfill_rows_skipped"), 1, "id 35 changed since the point (36 is gone)");
            assert_eq!(source.metrics.notes()["backfill_2"], "done rows=9 skipped=1");

            // A repeat is ignored; a condition the server refuses fails the backfill, not the stream.
            source.order(SourceOrder::Backfill { id: 2, filter: "true".into() }).await.unwrap();
            assert!(source.backfills.is_empty(), "a repeat of backfill 2");
            source.order(SourceOrder::Backfill { id: 3, filter: "no_such_column > 1".into() }).await.unwrap();
            until(&mut source, &mut topic, "backfill 3 fails", |s| gauge(s, "backfill_failed_id") == 3).await;
            let why = source.metrics.notes()["backfill_3"].clone();
            assert!(why.starts_with("failed: ") && why.contains("no_such_column"), "{why}");
            source.order(SourceOrder::Backfill { id: 4, filter: "id IN (SELECT id FROM other)".into() }).await.unwrap();
            assert!(source.backfills.is_empty() && source.metrics.notes()["backfill_4"].contains("not allowed"));
            db.insert_rows(1000, 1010).await;
            catch_up(&db, &mut source, &mut topic).await;
            assert!(source.backfills.is_empty());
            drop(source);
            db.drop_all().await;
        }

        /// A transaction left open holds slot creation up: the source names its backend until it ends.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn slot_creation_names_the_transaction_it_waits_for() {
            let Some(url) = url() else { return };
            let db = Db::new(url).await;
            db.insert_rows(1, 10).await;
            let (blocker, connection) = tokio_postgres::connect(&db.url, NoTls).await.unwrap();
            tokio::spawn(connection);
            blocker.batch_execute(&format!("BEGIN; INSERT INTO {}.unpublished (v) VALUES ('held')", db.schema)).await.unwrap();
            let pid: i32 = blocker.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
            let o = db.options();
            let (tx, rx) = oneshot::channel();
            let start = db.start_with(&o, move |ctx| {
                let _ = tx.send(ctx.metrics.clone());
            });
            let watch = async {
                let metrics = rx.await.unwrap();
                let deadline = Instant::now() + Duration::from_secs(20);
                while metrics.gauges().get("slot_waiting_for_pid") != Some(&i64::from(pid)) {
                    assert!(Instant::now() < deadline, "the blocking backend {pid} is not named: {:?}", metrics.gauges());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                blocker.batch_execute("COMMIT").await.unwrap();
            };
            let ((source, metrics), ()) = tokio::join!(start, watch);
            let mut source = source.expect("the slot is created once the transaction ends");
            assert_eq!(metrics.gauges().get("slot_waiting_for_pid"), Some(&0));
            let mut topic = Upserted::default();
            catch_up(&db, &mut source, &mut topic).await;
            drop(source);
            db.drop_all().await;
        }

        /// The first error the source returns within 20 s.
        async fn next_error(source: &mut PostgresCdc) -> String {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                assert!(Instant::now() < deadline, "no error");
                match tokio::time::timeout(Duration::from_millis(50), source.next_batch()).await {
                    Ok(Err(e)) => return e.to_string(),
                    Ok(Ok(_)) => source.handed_on().await.unwrap(),
                    // As the task loop's tick does: hand on, then tick.
                    Err(_) => {
                        source.handed_on().await.unwrap();
                        source.tick().await.unwrap();
                    }
                }
            }
        }

        /// Rows by id, as an upsert consumer keeps them.
        async fn read_until(source: &mut PostgresCdc, rows: &mut BTreeMap<i64, Row>, done: impl Fn(&BTreeMap<i64, Row>) -> bool) {
            read_until_source(source, rows, |_, rows| done(rows)).await
        }

        /// As [`read_until`], until `done` holds of the source and the rows.
        async fn read_until_source(
            source: &mut PostgresCdc,
            rows: &mut BTreeMap<i64, Row>,
            done: impl Fn(&PostgresCdc, &BTreeMap<i64, Row>) -> bool,
        ) {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !done(source, rows) {
                assert!(Instant::now() < deadline, "not there: {rows:?} {:?}", source.metrics.notes());
                if let Ok(next) = tokio::time::timeout(Duration::from_millis(50), source.next_batch()).await {
                    let batch = next.unwrap_or_else(|e| panic!("next_batch: {e}")).unwrap();
                    for (row, op) in batch.rows.iter().zip(&batch.ops) {
                        let Value::Int(id) = row[0] else { panic!("{row:?}") };
                        match op {
                            Op::Insert => rows.insert(id, row.clone()),
                            Op::Retract => rows.remove(&id),
                        };
                    }
                }
                source.handed_on().await.unwrap();
                source.tick().await.unwrap();
            }
        }

        /// Columns added and dropped while the job streams: with `fail` the job stops, naming the
        /// change; with `evolve` a declared column the table lacks reads as NULL until it is added
        /// and after it is dropped, an undeclared one is not read; a rename stops either.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn schema_changes_fail_or_evolve_as_the_job_chose() {
            let Some(url) = url() else { return };
            let db = Db::new(url).await;
            db.insert_rows(1, 100).await;
            let t = db.table();
            let int = |v: i64| Value::Int(v);

            // fail, a column added that the job does not read.
            let fail = PostgresCdcOptions {
                columns: "id BIGINT, device VARCHAR, duration_ms BIGINT".into(),
                version_column: None,
                ..db.options()
            };
            let (source, _) = db.start(&fail).await;
            let mut source = source.unwrap();
            let mut rows = BTreeMap::new();
            read_until(&mut source, &mut rows, |r| r.len() == 100).await;
            db.exec(&format!("ALTER TABLE {t} ADD COLUMN extra bigint; UPDATE {t} SET extra = 7 WHERE id = 1")).await;
            let e = next_error(&mut source).await;
            assert!(e.contains("`extra`") && e.contains("was added") && e.contains("schema_changes"), "{e}");
            drop(source);
            // Declared now, it is read (`resume` goes on from the slot: the change comes again).
            let declared = PostgresCdcOptions {
                columns: "id BIGINT, device VARCHAR, duration_ms BIGINT, extra BIGINT".into(),
                existing_slot: ExistingSlot::Resume,
                ..fail.clone()
            };
            let (source, _) = db.start(&declared).await;
            let mut source = source.unwrap();
            read_until(&mut source, &mut rows, |r| r.get(&1).is_some_and(|row| row.get(3) == Some(&int(7)))).await;
            // fail, a column it reads dropped.
            db.exec(&format!("ALTER TABLE {t} DROP COLUMN device; UPDATE {t} SET duration_ms = 1 WHERE id = 2")).await;
            let e = next_error(&mut source).await;
            assert!(e.contains("`device`") && e.contains("was dropped") && e.contains("evolve"), "{e}");
            drop(source);

            // evolve: `later` is declared before the table has it; `device` is gone already.
            let evolve = PostgresCdcOptions {
                columns: "id BIGINT, device VARCHAR, duration_ms BIGINT, later BIGINT".into(),
                schema_changes: SchemaChanges::Evolve,
                existing_slot: ExistingSlot::Reread,
                ..fail.clone()
            };
            let (source, _) = db.start(&evolve).await;
            let mut source = source.unwrap();
            rows.clear();
            read_until(&mut source, &mut rows, |r| r.len() == 100).await;
            assert_eq!(rows[&3], [int(3), Value::Null, int(30), Value::Null], "missing columns read as NULL");
            db.exec(&format!(
                "ALTER TABLE {t} ADD COLUMN later bigint; UPDATE {t} SET later = id * 2 WHERE id <= 10;
                 ALTER TABLE {t} ADD COLUMN undeclared text; INSERT INTO {t} (id, later, undeclared) VALUES (500, 1, 'x');"
            ))
            .await;
            read_until(&mut source, &mut rows, |r| r.get(&500).is_some()).await;
            assert_eq!(rows[&4], [int(4), Value::Null, int(40), int(8)], "the added column's values flow");
            assert_eq!(rows[&500], [int(500), Value::Null, Value::Null, int(1)]);
            db.exec(&format!("ALTER TABLE {t} DROP COLUMN later; UPDATE {t} SET duration_ms = 5 WHERE id = 4")).await;
            read_until(&mut source, &mut rows, |r| r[&4][2] == int(5)).await;
            assert_eq!(rows[&4], [int(4), Value::Null, int(5), Value::Null], "a dropped column reads as NULL");
            // A rename is refused, even of a column it does not read.
            db.exec(&format!("ALTER TABLE {t} RENAME COLUMN event_type TO kind; UPDATE {t} SET duration_ms = 6 WHERE id = 5")).await;
            let e = next_error(&mut source).await;
            assert!(e.contains("`event_type`") && e.contains("`kind`") && e.contains("rename"), "{e}");
            drop(source);
            db.drop_all().await;
        }

        /// `extra_columns` under `evolve`: the undeclared columns ride in one JSON object, typed as
        /// declared ones would be, from the snapshot on; a column added while the job streams
        /// joins it, a dropped one leaves it, and an unchanged TOASTed value stays whole; a
        /// backfill reads the columns the table has, though no change has described them yet.
        /// Under `fail`, dropping a carried column stops the job.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn undeclared_and_added_columns_ride_in_the_extra_object() {
            let Some(url) = url() else { return };
            let db = Db::new(url).await;
            db.insert_rows(1, 40).await;
            let t = db.table();
            let o = PostgresCdcOptions {
                columns: "id BIGINT, duration_ms BIGINT".into(),
                extra_columns: Some("more".into()),
                schema_changes: SchemaChanges::Evolve,
                ..db.options()
            };
            let (source, _) = db.start_with(&o, |ctx| ctx.checkpointing = true).await;
            let mut source = source.unwrap();
            let mut rows = BTreeMap::new();
            let extra = |row: &Row| -> serde_json::Value {
                let Value::String(text) = &row[2] else { panic!("no object in {row:?}") };
                serde_json::from_str(text).unwrap()
            };
            read_until(&mut source, &mut rows, |r| r.len() == 40).await;
            let three = extra(&rows[&3]);
            assert_eq!(rows[&3][1], Value::Int(30));
            assert!(matches!(rows[&3][3], Value::Int(v) if v > 0), "the version comes last: {:?}", rows[&3]);
            assert_eq!(three["event_ts"], "2024-05-01T00:00:03.703Z", "a timestamp as a declared one: {three}");
            assert_eq!(three["flagged"], serde_json::json!(false));
            assert_eq!(three["score"].as_f64().map(|f| (f * 1000.0).round()), Some(429.0), "{three}");
            assert_eq!(three["event_type"], "click");
            assert_eq!(three["device"], "dévice-0");
            assert_eq!(three["note"], "not read");
            assert!(three["raw_payload"].as_str().is_some_and(|p| p.contains("\"g\": 3")), "{three}");
            assert!(three.get("id").is_none() && three.get("duration_ms").is_none(), "declared columns stay out: {three}");
            assert_eq!(extra(&rows[&5])["device"], serde_json::Value::Null);

            db.exec(&format!(
                "ALTER TABLE {t} ADD COLUMN later bigint; UPDATE {t} SET later = id * 2 WHERE id <= 10;
                 UPDATE {t} SET raw_payload = jsonb_build_object('pad', repeat('x', 5000)) WHERE id = 20;
                 UPDATE {t} SET duration_ms = 1 WHERE id = 20;"
            ))
            .await;
            read_until(&mut source, &mut rows, |r| r[&20][1] == Value::Int(1)).await;
            assert_eq!(extra(&rows[&4])["later"], 8, "an added column's values flow: {:?}", rows[&4]);
            assert_eq!(extra(&rows[&4])["device"], "dévice-1");
            assert!(extra(&rows[&30]).get("later").is_none(), "rows not changed since keep their object");
            let twenty = extra(&rows[&20]);
            assert_eq!(twenty["later"], serde_json::Value::Null);
            assert!(twenty["raw_payload"].as_str().is_some_and(|p| p.len() > 5000), "an unchanged TOASTed value: {twenty}");

            db.exec(&format!("ALTER TABLE {t} DROP COLUMN note; UPDATE {t} SET duration_ms = 2 WHERE id = 4")).await;
            read_until(&mut source, &mut rows, |r| r[&4][1] == Value::Int(2)).await;
            let four = extra(&rows[&4]);
            assert!(four.get("note").is_none() && four["later"] == 8, "a dropped column leaves the object: {four}");

            // No change to the table since these: a backfill reads its columns as they are.
            db.exec(&format!("ALTER TABLE {t} ADD COLUMN dflt int DEFAULT 5; ALTER TABLE {t} DROP COLUMN device")).await;
            let tmp = Path::new("/nonexistent");
            source.order(SourceOrder::Backfill { id: 1, filter: "id <= 3".into() }).await.unwrap();
            source.snapshot(1, tmp).await.unwrap();
            read_until_source(&mut source, &mut rows, |s, _| s.point_held.is_some()).await;
            source.snapshot(2, tmp).await.unwrap();
            source.checkpoint_complete(2).await.unwrap();
            let done = |s: &PostgresCdc, _: &BTreeMap<i64, Row>| s.metrics.gauges().get("backfill_done_id") == Some(&1);
            read_until_source(&mut source, &mut rows, done).await;
            assert_eq!(source.metrics.notes().get("backfill_1").map(String::as_str), Some("done rows=3 skipped=0"));
            let one = extra(&rows[&1]);
            assert!(one["dflt"] == 5 && one.get("device").is_none() && one["flagged"] == false, "{one}");
            drop(source);

            // fail: a carried column dropped stops the job, named (on a new slot: the old one would
            // replay the changes above under the new policy).
            db.drop_slot().await;
            let fail = PostgresCdcOptions { schema_changes: SchemaChanges::Fail, snapshot: false, ..o };
            let (source, _) = db.start(&fail).await;
            let mut source = source.unwrap();
            db.exec(&format!("UPDATE {t} SET duration_ms = 3 WHERE id = 8")).await;
            read_until(&mut source, &mut rows, |r| r[&8][1] == Value::Int(3)).await;
            db.exec(&format!("ALTER TABLE {t} DROP COLUMN flagged; UPDATE {t} SET duration_ms = 4 WHERE id = 8")).await;
            let e = next_error(&mut source).await;
            assert!(e.contains("`flagged`") && e.contains("extra_columns carries it"), "{e}");
            drop(source);
            db.drop_all().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_restore_resumes_where_its_checkpoint_stopped_and_a_lost_slot_is_an_error() {
            let Some(url) = url() else { return };
            let db = Db::new(url).await;
            db.insert_rows(1, 1_000).await;
            let o = db.options();
            let (source, _) = db.start_with(&o, |ctx| ctx.checkpointing = true).await;
            let mut source = source.unwrap();
            let mut topic = Upserted::default();
            catch_up(&db, &mut source, &mut topic).await;
            db.insert_rows(1_001, 1_050).await;
            catch_up(&db, &mut source, &mut topic).await;
            let first = source.snapshot(1, Path::new("/nonexistent")).await.unwrap();
            source.checkpoint_complete(1).await.unwrap();
            db.insert_rows(1_051, 1_100).await;
            catch_up(&db, &mut source, &mut topic).await;
            let second = source.snapshot(2, Path::new("/nonexistent")).await.unwrap();
            let restored = Position::restored(&RestoredState { inline: second.inline.clone(), files: None }).unwrap().unwrap();
            // Checkpoint 2 never completes: the slot stays at checkpoint 1's position.
            db.exec(&format!("UPDATE {} SET duration_ms = 7 WHERE id <= 50", db.table())).await;
            db.insert_rows(1_101, 1_110).await;
            catch_up(&db, &mut source, &mut topic).await;
            // What followed the checkpoint's position: its versions are above the last it holds.
            // (The last insert's rows may have been handed on before the end of their transaction,
            // which the checkpoint then does not cover: they come again, under the same versions.)
            let since: Vec<_> = topic.taken.iter().filter(|(_, version, _)| *version as u64 > restored.version).copied().collect();
            assert!(since.len() == 60 || since.len() == 110, "{since:?}");
            drop(source);

            // Restored from checkpoint 2, the source replays what followed it, with the same
            // versions, and nothing before it (the slot itself is further back).
            let slot = db.confirmed().await.unwrap();
            assert!(slot < restored.lsn.0, "the slot ({slot:x}) is behind checkpoint 2 ({})", restored.lsn);
            let (source, _) = db
                .start_with(&o, |ctx| {
                    ctx.checkpointing = true;
                    ctx.attempt = 2;
                    ctx.restore = restore_of(2, &second);
                })
                .await;
            let mut source = source.unwrap();
            let mut replay = Upserted::default();
            let deadline = Instant::now() + Duration::from_secs(30);
            while replay.taken.len() < since.len() {
                assert!(Instant::now() < deadline, "replayed {:?} of {since:?}", replay.taken);
                step(&mut source, &mut replay).await;
            }
            assert_eq!(replay.taken, since, "the replay differs from the first reading");
            drop(source);
            // The slot moved to where the replay started.
            wait_slot(&db, "slot at checkpoint 2", |at| at >= Some(restored.lsn.0)).await;

            // An older checkpoint cannot be restored: the slot cannot go back.
            let (source, _) = db
                .start_with(&o, |ctx| {
                    ctx.checkpointing = true;
                    ctx.attempt = 3;
                    ctx.restore = restore_of(1, &first);
                })
                .await;
            let e = source.err().expect("restoring behind the slot").to_string();
            assert!(e.contains("past") && e.contains("checkpoint 1"), "{e}");

            // A new job over the slot says what it can do; `resume` streams from it.
            let e = db.start(&o).await.0.err().expect("a new job over an existing slot").to_string();
            assert!(e.contains("already exists") && e.contains("existing_slot"), "{e}");
            let resume = PostgresCdcOptions { existing_slot: ExistingSlot::Resume, ..o.clone() };
            let released = Arc::new(AtomicBool::new(false));
            let (source, _) = db.start_with(&resume, |ctx| ctx.released = released.clone()).await;
            let source = source.unwrap();
            // Cancelled for good: the slot goes.
            released.store(true, Ordering::SeqCst);
            drop(source);
            wait_slot(&db, "the slot of a cancelled job to be dropped", |at| at.is_none()).await;
            // And the publication the job created, which no other job uses.
            let deadline = Instant::now() + Duration::from_secs(10);
            let publication = "SELECT count(*) FROM pg_publication WHERE pubname = $1";
            while db.client.query_one(publication, &[&db.publication]).await.unwrap().get::<_, i64>(0) != 0 {
                assert!(Instant::now() < deadline, "the publication the cancelled job created is still there");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }

            // A restore whose slot is gone is an error, not a new snapshot.
            let (source, _) = db
                .start_with(&o, |ctx| {
                    ctx.checkpointing = true;
                    ctx.attempt = 4;
                    ctx.restore = restore_of(2, &second);
                })
                .await;
            let e = source.err().expect("restoring without the slot").to_string();
            assert!(e.contains("is gone"), "{e}");
            assert_eq!(db.confirmed().await, None, "no slot was created");
            db.drop_all().await;
        }

        /// Two tables in one job (two sources, each with its own slot): the publication Eddy made
        /// for the first takes the second table, each source reads its own table only, and the
        /// publication goes once both jobs' sources are released.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn two_tables_share_a_publication_and_release_it_together() {
            let Some(url) = url() else { return };
            let db = Db::new(url).await;
            db.insert_rows(1, 50).await;
            db.exec(&format!("ALTER TABLE {s}.unpublished REPLICA IDENTITY FULL; INSERT INTO {s}.unpublished (v) SELECT 'v' || g FROM generate_series(1, 30) g", s = db.schema)).await;
            let events = PostgresCdcOptions { columns: "id BIGINT, device VARCHAR".into(), version_column: None, ..db.options() };
            let other = PostgresCdcOptions {
                table: format!("{}.unpublished", db.schema),
                columns: "id BIGINT, v VARCHAR".into(),
                slot: format!("{}_2", db.slot),
                ..events.clone()
            };
            let released = Arc::new(AtomicBool::new(false));
            let (a, _) = db.start_with(&events, |ctx| ctx.released = released.clone()).await;
            let (b, _) = db.start_with(&other, |ctx| ctx.released = released.clone()).await;
            let (mut a, mut b) = (a.unwrap(), b.unwrap());
            let tables = "SELECT count(*) FROM pg_publication_tables WHERE pubname = $1";
            assert_eq!(db.client.query_one(tables, &[&db.publication]).await.unwrap().get::<_, i64>(0), 2);
            let (mut rows_a, mut rows_b) = (BTreeMap::new(), BTreeMap::new());
            read_until(&mut a, &mut rows_a, |r| r.len() == 50).await;
            read_until(&mut b, &mut rows_b, |r| r.len() == 30).await;
            db.exec(&format!(
                "INSERT INTO {t} (id, device) VALUES (900, 'tv'); UPDATE {s}.unpublished SET v = 'changed' WHERE id = 3",
                t = db.table(),
                s = db.schema
            ))
            .await;
            read_until(&mut a, &mut rows_a, |r| r.contains_key(&900)).await;
            read_until(&mut b, &mut rows_b, |r| r[&3][1] == Value::String("changed".into())).await;
            assert_eq!((rows_a.len(), rows_b.len()), (51, 30), "each source reads its own table");
            released.store(true, Ordering::SeqCst);
            drop((a, b));
            let deadline = Instant::now() + Duration::from_secs(10);
            let publication = "SELECT count(*) FROM pg_publication WHERE pubname = $1";
            while db.client.query_one(publication, &[&db.publication]).await.unwrap().get::<_, i64>(0) != 0 {
                assert!(Instant::now() < deadline, "the publication is still there after both were released");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            db.drop_all().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn start_says_what_to_fix() {
            let Some(url) = url() else { return };
            let db = Db::new(url).await;
            let fails = |o: PostgresCdcOptions| {
                let db = &db;
                async move {
                    match db.start(&o).await.0 {
                        Ok(_) => panic!("started"),
                        Err(e) => e,
                    }
                }
            };
            let e = fails(PostgresCdcOptions { table: format!("{}.nope", db.schema), ..db.options() }).await;
            assert_eq!(e.blame, Blame::User);
            assert!(e.message.contains("does not exist"), "{}", e.message);

            let e = fails(PostgresCdcOptions { columns: "id BIGINT, colour VARCHAR".into(), ..db.options() }).await;
            assert_eq!(e.blame, Blame::User);
            assert!(e.message.contains("no column `colour`"), "{}", e.message);

            let e = fails(PostgresCdcOptions { columns: "id BIGINT, event_ts BOOLEAN".into(), ..db.options() }).await;
            assert_eq!(e.blame, Blame::User);
            assert!(e.message.contains("declare it as TIMESTAMP"), "{}", e.message);

            db.exec(&format!("ALTER TABLE {} REPLICA IDENTITY DEFAULT", db.table())).await;
            let e = fails(db.options()).await;
            assert_eq!(e.blame, Blame::User);
            assert!(e.message.contains("REPLICA IDENTITY FULL"), "{}", e.message);

            let e = fails(PostgresCdcOptions { url: "postgres://eddy@127.0.0.1:1/eddy".into(), ..db.options() }).await;
            assert_eq!(e.blame, Blame::External, "{}", e.message);
            assert!(db.confirmed().await.is_none(), "no slot is left behind");
            db.drop_all().await;
        }
    }
}
