//! The coordinator's durable metadata as a replicated-state-machine seam.
//!
//! What must outlive a coordinator is the jobs: their specs, states, attempts, restart counts,
//! checkpoint id counters, kept checkpoints and savepoints, and the savepoint each started from.
//! Workers, heartbeats, task reports and metrics are soft: a new coordinator hears them again.
//!
//! Every durable change is a [`MetaCommand`]. [`MetaState::apply`] is the only way the durable
//! state changes: it checks the command against the state (an unknown job, a job submitted twice,
//! an impossible state change, an attempt that does not grow, a checkpoint id already used are
//! refused, and a refused command changes nothing) and is deterministic, so the same commands in
//! the same order give the same state on every node. A [`MetaLog`] makes each applied command
//! durable: [`LocalLog`] (the default, one coordinator) appends it to a file; a Raft log replaces
//! it without the coordinator's loop changing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::state::JobState;
use crate::store::{CheckpointRecord, JobRecord};

/// One durable change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum MetaCommand {
    /// A new job, as submitted (state `created`, attempt 1).
    Submitted { job: JobRecord },
    /// The job's state (or, for the same state, its cause) changed. A job that ends cancelled or
    /// finished keeps only its savepoints: nothing restores from its checkpoints again.
    StateChanged { job_id: String, to: JobState, cause: String },
    /// A new attempt of the job deploys; attempts only grow, so two never write at once.
    AttemptStarted { job_id: String, attempt: u64 },
    /// The job failed and restarts (counted for its status).
    Restarted { job_id: String },
    /// Checkpoint ids below `next` are used up (a checkpoint started); never handed out again.
    CheckpointIdsUsed { job_id: String, next: u64 },
    /// A checkpoint (or savepoint) completed; `dropped` are the older ones no longer kept.
    CheckpointCompleted { job_id: String, checkpoint: CheckpointRecord, dropped: Vec<u64> },
    /// The job runs at a new parallelism from its next attempt on.
    Rescaled { job_id: String, parallelism: u32 },
    /// An ended job is no longer kept.
    Forgotten { job_id: String },
}

impl MetaCommand {
    /// The job the command is about.
    pub fn job_id(&self) -> &str {
        match self {
            MetaCommand::Submitted { job } => &job.job_id,
            MetaCommand::StateChanged { job_id, .. }
            | MetaCommand::AttemptStarted { job_id, .. }
            | MetaCommand::Restarted { job_id }
            | MetaCommand::CheckpointIdsUsed { job_id, .. }
            | MetaCommand::CheckpointCompleted { job_id, .. }
            | MetaCommand::Rescaled { job_id, .. }
            | MetaCommand::Forgotten { job_id } => job_id,
        }
    }
}

/// Why a command was refused, or could not be made durable.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum MetaError {
    #[error("no job {0}")]
    NoSuchJob(String),
    #[error("job {0} exists already")]
    Exists(String),
    #[error("job {job_id} cannot go from {from} to {to}")]
    Transition { job_id: String, from: JobState, to: JobState },
    #[error("job {job_id} is at attempt {current}; attempt {proposed} would not be newer")]
    StaleAttempt { job_id: String, current: u64, proposed: u64 },
    #[error("job {job_id}: checkpoint {id} is below the next id {next}, already used")]
    UsedCheckpointId { job_id: String, id: u64, next: u64 },
    #[error("job {job_id} is {state}; only an ended job is forgotten")]
    NotEnded { job_id: String, state: JobState },
    #[error("a parallelism of 0")]
    ZeroParallelism,
    #[error("{0}")]
    Storage(String),
}

/// The durable metadata: every job, by id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetaState {
    /// Commands applied so far (the index of the last one).
    #[serde(default)]
    pub applied: u64,
    /// Stored as a list, as the metadata file always held them.
    #[serde(serialize_with = "jobs_as_list", deserialize_with = "jobs_from_list")]
    pub jobs: BTreeMap<String, JobRecord>,
}

fn jobs_as_list<S: serde::Serializer>(jobs: &BTreeMap<String, JobRecord>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(jobs.values())
}

fn jobs_from_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, JobRecord>, D::Error> {
    let list = Vec::<JobRecord>::deserialize(d)?;
    Ok(list.into_iter().map(|j| (j.job_id.clone(), j)).collect())
}

impl MetaState {
    /// Applies `command`, or refuses it and changes nothing.
    pub fn apply(&mut self, command: &MetaCommand) -> Result<(), MetaError> {
        self.check(command)?;
        self.applied += 1;
        let job_id = command.job_id().to_string();
        if let MetaCommand::Submitted { job } = command {
            self.jobs.insert(job_id, job.clone());
            return Ok(());
        }
        if let MetaCommand::Forgotten { .. } = command {
            self.jobs.remove(&job_id);
            return Ok(());
        }
        let job = self.jobs.get_mut(&job_id).expect("checked");
        match command {
            MetaCommand::StateChanged { to, cause, .. } => {
                job.state = *to;
                job.cause = cause.clone();
                if matches!(to, JobState::Cancelled | JobState::Finished) {
                    job.checkpoints.retain(|c| c.savepoint);
                }
            }
            MetaCommand::AttemptStarted { attempt, .. } => job.attempt = *attempt,
            MetaCommand::Restarted { .. } => job.restarts += 1,
            MetaCommand::CheckpointIdsUsed { next, .. } => job.next_checkpoint_id = job.next_checkpoint_id.max(*next),
            MetaCommand::CheckpointCompleted { checkpoint, dropped, .. } => {
                job.checkpoints.retain(|c| !dropped.contains(&c.id));
                job.checkpoints.push(checkpoint.clone());
                job.next_checkpoint_id = job.next_checkpoint_id.max(checkpoint.id + 1);
            }
            MetaCommand::Rescaled { parallelism, .. } => job.parallelism = Some(*parallelism),
            MetaCommand::Submitted { .. } | MetaCommand::Forgotten { .. } => unreachable!("handled above"),
        }
        Ok(())
    }

    /// Whether `command` applies to this state, and if not, why.
    pub fn check(&self, command: &MetaCommand) -> Result<(), MetaError> {
        let job_id = command.job_id();
        let job = match (command, self.jobs.get(job_id)) {
            (MetaCommand::Submitted { .. }, Some(_)) => return Err(MetaError::Exists(job_id.into())),
            (MetaCommand::Submitted { job }, None) => {
                if job.state != JobState::Created {
                    return Err(MetaError::Transition { job_id: job_id.into(), from: JobState::Created, to: job.state });
                }
                return Ok(());
            }
            (_, None) => return Err(MetaError::NoSuchJob(job_id.into())),
            (_, Some(job)) => job,
        };
        match command {
            MetaCommand::StateChanged { to, .. } if *to != job.state && !job.state.can_become(*to) => {
                Err(MetaError::Transition { job_id: job_id.into(), from: job.state, to: *to })
            }
            MetaCommand::AttemptStarted { attempt, .. } if *attempt <= job.attempt => {
                Err(MetaError::StaleAttempt { job_id: job_id.into(), current: job.attempt, proposed: *attempt })
            }
            MetaCommand::CheckpointCompleted { checkpoint, .. } if job.checkpoints.iter().any(|c| c.id >= checkpoint.id) => {
                let next = job.checkpoints.iter().map(|c| c.id + 1).max().unwrap_or(0);
                Err(MetaError::UsedCheckpointId { job_id: job_id.into(), id: checkpoint.id, next })
            }
            MetaCommand::Rescaled { parallelism: 0, .. } => Err(MetaError::ZeroParallelism),
            MetaCommand::Forgotten { .. } if !job.state.is_terminal() => {
                Err(MetaError::NotEnded { job_id: job_id.into(), state: job.state })
            }
            _ => Ok(()),
        }
    }
}

/// Where applied commands become durable.
pub trait MetaLog: Send {
    /// Makes `command`, just applied to `state`, durable after every command before it. An error
    /// means it may not be: the log then catches up with `state` on its next write.
    fn append(&mut self, command: &MetaCommand, state: &MetaState) -> Result<(), MetaError>;
}

/// The durable metadata as applied, and the log that makes each change durable: the one way the
/// coordinator's loop changes it.
pub struct Metadata {
    pub state: MetaState,
    /// `None`: nowhere (tests).
    log: Option<Box<dyn MetaLog>>,
}

impl Metadata {
    pub fn new(state: MetaState, log: Option<Box<dyn MetaLog>>) -> Metadata {
        Metadata { state, log }
    }

    /// Applies `command` and makes it durable; false if it was refused (a bug: logged) or not
    /// written (logged; the log catches up on its next write).
    pub fn record(&mut self, command: MetaCommand) -> bool {
        self.try_record(command).is_ok()
    }

    /// [`Metadata::record`], saying why not.
    pub fn try_record(&mut self, command: MetaCommand) -> Result<(), MetaError> {
        if let Err(e) = self.state.apply(&command) {
            tracing::warn!(job_id = command.job_id(), error = %e, ?command, "metadata change refused");
            return Err(e);
        }
        let Some(log) = &mut self.log else { return Ok(()) };
        log.append(&command, &self.state).inspect_err(|e| {
            tracing::warn!(error = %e, "cannot write job metadata; a coordinator restart would lose the latest changes");
        })
    }
}

/// A [`MetaLog`] in a data directory: `jobs.json` holds the state as of some command (written
/// atomically: write, fsync, rename), `meta.log` the commands after it, one JSON line each with
/// its index, appended and fsynced one by one. Once the log is long the state is written again and
/// the log started anew. The directory is locked while the log lives: two coordinators on one
/// directory would resume the same jobs under colliding attempt numbers and each delete files the
/// other's checkpoints use.
pub struct LocalLog {
    dir: PathBuf,
    file: File,
    /// Commands in `meta.log`.
    entries: u64,
    /// A write failed: the next one writes the whole state.
    behind: bool,
    _lock: File,
}

/// Commands appended before the state is written whole and the log restarted.
const COMPACT_AFTER: u64 = 1000;

#[derive(Serialize, Deserialize)]
struct Entry {
    index: u64,
    command: MetaCommand,
}

/// Options that create a file only its owner may read or write: the metadata holds every job's
/// spec, database passwords included.
fn owner_only() -> std::fs::OpenOptions {
    let mut options = std::fs::OpenOptions::new();
    options.create(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

impl LocalLog {
    /// Opens (creating it when missing) the log in `dir`, and reads the state it holds.
    pub fn open(dir: &Path) -> anyhow::Result<(LocalLog, MetaState)> {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create the data directory {}: {e}; pick another with --data-dir", dir.display()))?;
        let lock_path = dir.join("LOCK");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}; pick another --data-dir", lock_path.display()))?;
        lock.try_lock().map_err(|_| {
            anyhow::anyhow!(
                "another coordinator is using the data directory {} (it holds {}); stop it, or give this one another --data-dir",
                dir.display(),
                lock_path.display()
            )
        })?;
        let snapshot = dir.join("jobs.json");
        let mut state = match std::fs::read(&snapshot) {
            Ok(bytes) => serde_json::from_slice::<MetaState>(&bytes)
                .map_err(|e| anyhow::anyhow!("{} is damaged ({e}); move it and meta.log away to start with no jobs", snapshot.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => MetaState::default(),
            Err(e) => anyhow::bail!("reading {}: {e}", snapshot.display()),
        };
        let log_path = dir.join("meta.log");
        let mut entries = 0;
        let bytes = match std::fs::read(&log_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => anyhow::bail!("reading {}: {e}", log_path.display()),
        };
        // Where the last whole command ends: what follows is a line cut short by a crash during
        // its write (never acknowledged), cut off before anything is appended after it.
        let mut good_end = 0;
        let lines: Vec<&[u8]> = bytes.split_inclusive(|b| *b == b'\n').collect();
        for (n, line) in lines.iter().enumerate() {
            let last = n + 1 == lines.len();
            let entry = match serde_json::from_slice::<Entry>(line) {
                Ok(e) if line.ends_with(b"\n") => e,
                _ if last => break,
                // Without its newline: only the last piece can be, and it was taken above.
                Ok(_) => break,
                Err(e) => anyhow::bail!(
                    "{} line {} is damaged ({e}); the metadata after it cannot be read: move the data directory away to start with no jobs",
                    log_path.display(),
                    n + 1
                ),
            };
            good_end += line.len();
            entries += 1;
            // Written before the state that already holds it was.
            if entry.index <= state.applied {
                continue;
            }
            if entry.index != state.applied + 1 {
                anyhow::bail!(
                    "{} line {}: command {} follows {}; the log is damaged",
                    log_path.display(),
                    n + 1,
                    entry.index,
                    state.applied
                );
            }
            state.apply(&entry.command).map_err(|e| {
                anyhow::anyhow!("{} line {}: command {} does not apply ({e}); the log is damaged", log_path.display(), n + 1, entry.index)
            })?;
        }
        if good_end < bytes.len() {
            let file = std::fs::OpenOptions::new().write(true).open(&log_path)?;
            file.set_len(good_end as u64)?;
            file.sync_all()?;
        }
        let file = owner_only().append(true).open(&log_path).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", log_path.display()))?;
        // Specs hold passwords: files an earlier version wrote readable by all are closed too.
        for path in [&log_path, &snapshot] {
            if path.exists() {
                std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            }
        }
        Ok((LocalLog { dir: dir.to_path_buf(), file, entries, behind: false, _lock: lock }, state))
    }

    /// Writes the whole state, then starts the log anew.
    fn write_state(&mut self, state: &MetaState) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
        let path = self.dir.join("jobs.json");
        let tmp = path.with_extension("json.tmp");
        {
            let mut f = owner_only().write(true).truncate(true).open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        File::open(&self.dir)?.sync_all()?;
        // The state holds every command of the log now: a crash before the truncation leaves
        // entries that a restart skips by their index.
        let file = owner_only().write(true).truncate(true).open(self.dir.join("meta.log"))?;
        file.sync_all()?;
        self.file = std::fs::OpenOptions::new().append(true).open(self.dir.join("meta.log"))?;
        self.entries = 0;
        Ok(())
    }

    fn write(&mut self, command: &MetaCommand, state: &MetaState) -> std::io::Result<()> {
        if self.behind || self.entries >= COMPACT_AFTER {
            return self.write_state(state);
        }
        let mut line = serde_json::to_vec(&Entry { index: state.applied, command: command.clone() }).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.sync_data()?;
        self.entries += 1;
        Ok(())
    }
}

impl MetaLog for LocalLog {
    fn append(&mut self, command: &MetaCommand, state: &MetaState) -> Result<(), MetaError> {
        let written = self.write(command, state);
        self.behind = written.is_err();
        written.map_err(|e| MetaError::Storage(format!("writing the metadata in {}: {e}", self.dir.display())))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A job as just submitted.
    pub(crate) fn job(id: &str) -> JobRecord {
        JobRecord {
            job_id: id.into(),
            spec: "name = \"x\"".into(),
            parallelism: None,
            attempt: 1,
            state: JobState::Created,
            cause: "submitted".into(),
            submitted_at_ms: 7,
            next_checkpoint_id: 1,
            restarts: 0,
            checkpoints: Vec::new(),
            from_savepoint: None,
        }
    }

    fn checkpoint(id: u64, savepoint: bool) -> CheckpointRecord {
        CheckpointRecord { id, savepoint, triggered_at_ms: 0, duration_ms: 1, full_bytes: 2, incremental_bytes: 3 }
    }

    fn state_changed(to: JobState) -> MetaCommand {
        MetaCommand::StateChanged { job_id: "j".into(), to, cause: to.to_string() }
    }

    /// Each command's effect, and the refusals, which change nothing.
    #[test]
    fn every_command_applies_and_every_illegal_one_is_refused() {
        let mut s = MetaState::default();
        assert_eq!(s.apply(&state_changed(JobState::Running)), Err(MetaError::NoSuchJob("j".into())));
        s.apply(&MetaCommand::Submitted { job: job("j") }).unwrap();
        assert_eq!(s.apply(&MetaCommand::Submitted { job: job("j") }), Err(MetaError::Exists("j".into())));
        let mut running = job("k");
        running.state = JobState::Running;
        assert!(matches!(s.apply(&MetaCommand::Submitted { job: running }), Err(MetaError::Transition { .. })));
        assert!(matches!(s.apply(&state_changed(JobState::Running)), Err(MetaError::Transition { .. })));
        assert!(matches!(s.apply(&MetaCommand::Forgotten { job_id: "j".into() }), Err(MetaError::NotEnded { .. })));
        for to in [JobState::Scheduling, JobState::Running] {
            s.apply(&state_changed(to)).unwrap();
        }
        // The same state again only says why.
        s.apply(&MetaCommand::StateChanged { job_id: "j".into(), to: JobState::Running, cause: "still".into() }).unwrap();
        assert_eq!(s.jobs["j"].cause, "still");
        s.apply(&MetaCommand::AttemptStarted { job_id: "j".into(), attempt: 2 }).unwrap();
        for attempt in [2, 1] {
            assert!(matches!(s.apply(&MetaCommand::AttemptStarted { job_id: "j".into(), attempt }), Err(MetaError::StaleAttempt { .. })));
        }
        s.apply(&MetaCommand::Restarted { job_id: "j".into() }).unwrap();
        s.apply(&MetaCommand::CheckpointIdsUsed { job_id: "j".into(), next: 4 }).unwrap();
        s.apply(&MetaCommand::CheckpointIdsUsed { job_id: "j".into(), next: 2 }).unwrap();
        assert_eq!(s.jobs["j"].next_checkpoint_id, 4, "the counter never goes back");
        s.apply(&MetaCommand::CheckpointCompleted { job_id: "j".into(), checkpoint: checkpoint(4, false), dropped: vec![] }).unwrap();
        s.apply(&MetaCommand::CheckpointCompleted { job_id: "j".into(), checkpoint: checkpoint(5, true), dropped: vec![] }).unwrap();
        let reused = MetaCommand::CheckpointCompleted { job_id: "j".into(), checkpoint: checkpoint(5, false), dropped: vec![] };
        assert!(matches!(s.apply(&reused), Err(MetaError::UsedCheckpointId { id: 5, next: 6, .. })));
        s.apply(&MetaCommand::CheckpointCompleted { job_id: "j".into(), checkpoint: checkpoint(6, false), dropped: vec![4] }).unwrap();
        assert_eq!(s.jobs["j"].checkpoints.iter().map(|c| c.id).collect::<Vec<_>>(), [5, 6]);
        assert_eq!(s.jobs["j"].next_checkpoint_id, 7);
        assert_eq!(s.apply(&MetaCommand::Rescaled { job_id: "j".into(), parallelism: 0 }), Err(MetaError::ZeroParallelism));
        s.apply(&MetaCommand::Rescaled { job_id: "j".into(), parallelism: 3 }).unwrap();
        let before = s.clone();
        for to in [JobState::Created, JobState::Scheduling, JobState::Cancelled] {
            assert!(matches!(s.apply(&state_changed(to)), Err(MetaError::Transition { .. })), "{to}");
        }
        assert_eq!(s, before, "refused commands change nothing");
        for to in [JobState::Cancelling, JobState::Cancelled] {
            s.apply(&state_changed(to)).unwrap();
        }
        let j = &s.jobs["j"];
        assert_eq!((j.attempt, j.restarts, j.parallelism), (2, 1, Some(3)));
        assert_eq!(j.checkpoints.iter().map(|c| c.id).collect::<Vec<_>>(), [5], "an ended job keeps its savepoints only");
        assert!(matches!(s.apply(&state_changed(JobState::Restarting)), Err(MetaError::Transition { .. })), "an ended job stays ended");
        s.apply(&MetaCommand::Forgotten { job_id: "j".into() }).unwrap();
        assert!(s.jobs.is_empty());
        assert_eq!(s.applied, 15);
    }

    /// What was applied comes back after a restart: from the log, then from the state written
    /// whole, with commands the state already holds skipped and a torn last line ignored.
    #[test]
    fn the_local_log_reads_back_what_was_applied() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let commands: Vec<MetaCommand> = std::iter::once(MetaCommand::Submitted { job: job("j") })
            .chain([JobState::Scheduling, JobState::Running].map(state_changed))
            .chain((1..=COMPACT_AFTER + 5).map(|i| MetaCommand::CheckpointIdsUsed { job_id: "j".into(), next: i }))
            .collect();
        let mut want = MetaState::default();
        {
            let (mut log, state) = LocalLog::open(&dir).unwrap();
            assert_eq!(state, want);
            for (n, c) in commands.iter().enumerate() {
                want.apply(c).unwrap();
                log.append(c, &want).unwrap();
                if n == 10 {
                    drop(log);
                    let (again, state) = LocalLog::open(&dir).unwrap();
                    assert_eq!(state, want, "from the log");
                    log = again;
                }
            }
        }
        let (_, state) = LocalLog::open(&dir).unwrap();
        assert_eq!(state, want, "from the state written whole and the log after it");
        // A crash between writing the state and starting the log anew: old entries are skipped.
        let log_path = dir.join("meta.log");
        let tail = std::fs::read_to_string(&log_path).unwrap();
        let stale = serde_json::to_string(&Entry { index: 2, command: state_changed(JobState::Scheduling) }).unwrap();
        std::fs::write(&log_path, format!("{stale}\n{tail}{{\"index\": 99, \"comm")).unwrap();
        let (mut log, state) = LocalLog::open(&dir).unwrap();
        assert_eq!(state, want, "stale entries skipped, a torn last line ignored");
        // What is appended next is a line of its own, read back after the next restart.
        let c = MetaCommand::CheckpointIdsUsed { job_id: "j".into(), next: 5000 };
        want.apply(&c).unwrap();
        log.append(&c, &want).unwrap();
        drop(log);
        let (_, state) = LocalLog::open(&dir).unwrap();
        assert_eq!(state, want, "the torn line was cut off before the append");
        let tail = std::fs::read_to_string(&log_path).unwrap();
        std::fs::write(&log_path, format!("{{\"index\"\n{tail}")).unwrap();
        let e = LocalLog::open(&dir).err().unwrap().to_string();
        assert!(e.contains("line 1 is damaged"), "{e}");
    }

    /// The metadata holds every spec, passwords included: its files are the owner's alone, also
    /// those an earlier version left readable by all.
    #[test]
    fn the_metadata_files_are_readable_by_their_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let mode = |name: &str| std::fs::metadata(tmp.path().join(name)).unwrap().permissions().mode() & 0o777;
        std::fs::write(tmp.path().join("jobs.json"), serde_json::to_vec(&MetaState::default()).unwrap()).unwrap();
        std::fs::set_permissions(tmp.path().join("jobs.json"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let (mut log, mut state) = LocalLog::open(tmp.path()).unwrap();
        assert_eq!((mode("meta.log"), mode("jobs.json")), (0o600, 0o600), "after opening");
        for i in 0..=COMPACT_AFTER {
            let c = if i == 0 {
                MetaCommand::Submitted { job: job("j") }
            } else {
                MetaCommand::CheckpointIdsUsed { job_id: "j".into(), next: i }
            };
            state.apply(&c).unwrap();
            log.append(&c, &state).unwrap();
        }
        assert_eq!((mode("meta.log"), mode("jobs.json")), (0o600, 0o600), "after the state was written whole");
    }

    #[test]
    fn a_data_directory_serves_one_coordinator_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let first = LocalLog::open(&dir).unwrap();
        let e = LocalLog::open(&dir).err().unwrap().to_string();
        assert!(e.contains("another coordinator") && e.contains("--data-dir"), "{e}");
        drop(first);
        LocalLog::open(&dir).expect("free again once the first is gone");
    }
}
