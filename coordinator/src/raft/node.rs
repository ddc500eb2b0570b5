//! The Raft node: one thread owns the `RawNode` and its storage, and runs the Ready loop in the
//! order raft-rs documents:
//!
//! 1. send the leader's messages (they need not wait for the disk);
//! 2. persist the snapshot, new entries and hard state in one write batch, synced when raft asks;
//! 3. only then apply committed entries, writing the applied index with the state they make;
//! 4. send the messages that had to wait for the disk (votes, append responses), and advance.
//!
//! A storage error stops the node (it never advances past a failed write); its status then says
//! why and the coordinator stops acting. Proposals come from the coordinator's loop, which waits
//! for each to be applied here before it tells anyone of the change.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfChangeType, Entry, EntryType, Message};
use raft::{RawNode, ReadOnlyOption, StateRole, Storage as _};
use tokio::sync::watch;
use tracing::{info, warn};

use super::storage::{Applied, DiskStorage};
use crate::meta::{MetaCommand, MetaError};

/// How one coordinator takes part.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    /// This coordinator's raft id (not 0).
    pub id: u64,
    /// The coordinators a new cluster starts with, by id: their addresses (raft and API on one
    /// port). Ignored once the storage holds a membership.
    pub peers: BTreeMap<u64, String>,
    /// The storage directory.
    pub dir: PathBuf,
    /// One raft tick.
    pub tick: Duration,
    /// Ticks without a leader before a follower campaigns (randomised up to twice this).
    pub election_ticks: usize,
    /// Ticks between the leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// Log entries kept before the applied state is snapshotted and the log cut.
    pub compact_after: u64,
    /// A new coordinator joining a running cluster (added with `eddy coordinators add`): it starts
    /// with no membership and learns it from the leader.
    pub join: bool,
}

impl RaftSettings {
    /// Settings for a coordinator `id` of `peers`, stored in `dir`: a 100 ms tick, an election
    /// after 1–2 s of silence, heartbeats every 200 ms.
    pub fn new(id: u64, peers: BTreeMap<u64, String>, dir: PathBuf) -> RaftSettings {
        RaftSettings {
            id,
            peers,
            dir,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            compact_after: 1000,
            join: false,
        }
    }
}

/// Where a node's messages go.
pub trait Transport: Send + 'static {
    /// Sends `messages` (best effort: raft sends again what is lost); `peers` are the addresses.
    fn send(&mut self, messages: Vec<Message>, peers: &BTreeMap<u64, String>);
}

/// This node's role and what it knows of the cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct RaftStatus {
    pub id: u64,
    pub role: StateRole,
    /// The leader's id, 0 when none is known.
    pub leader: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    /// The last index in this node's log.
    pub last_index: u64,
    /// Leader, with every entry of earlier terms applied: the coordinator may act.
    pub leading: bool,
    /// Addresses by raft id.
    pub peers: BTreeMap<u64, String>,
    /// The leader's view of each coordinator: how far its log matches the leader's, and whether
    /// it answered lately (empty on a follower).
    pub matched: BTreeMap<u64, (u64, bool)>,
    /// Snapshots received from a leader (a follower far behind catches up through one).
    pub snapshots_received: u64,
    /// Why the node stopped (a storage error), if it did.
    pub stopped: Option<String>,
}

impl RaftStatus {
    /// The leader's address, when one is known.
    pub fn leader_address(&self) -> Option<&str> {
        self.peers.get(&self.leader).map(String::as_str).filter(|_| self.leader != 0)
    }
}

/// Why a proposal did not take effect.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProposeError {
    #[error("this coordinator is not the leader{}", leader.as_ref().map(|l| format!("; the leader is at {l}")).unwrap_or_else(|| "; no leader is elected (are most coordinators down?)".into()))]
    NotLeader { leader: Option<String> },
    #[error("leadership was lost before the change was committed; it may or may not take effect")]
    Lost,
    #[error("the change was refused: {0}")]
    Refused(MetaError),
    #[error("the raft node stopped: {0}")]
    Stopped(String),
    #[error("another change of the coordinators is under way; try again once it is applied")]
    MembershipBusy,
}

/// What the node is asked to do.
pub enum Input {
    /// A message from another node.
    Step(Box<Message>),
    /// Append a command; answered once it is applied here.
    Propose { command: MetaCommand, reply: Sender<Result<(), ProposeError>> },
    /// Add a coordinator (with its address) or remove one; answered once applied.
    ChangeMembers { add: Option<(u64, String)>, remove: Option<u64>, reply: Sender<Result<(), ProposeError>> },
    /// The applied state, for a coordinator that starts to lead.
    Applied { reply: Sender<Applied> },
    /// A peer could not be reached.
    Unreachable(u64),
}

/// A running node: send it [`Input`]s, watch its [`RaftStatus`].
pub struct RaftHandle {
    pub inputs: Sender<Input>,
    pub status: watch::Receiver<RaftStatus>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RaftHandle {
    /// Whether the node's thread has ended (it stopped, or crashed as a test asked).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the node and waits for its thread.
    pub fn stop(mut self) {
        self.join();
    }

    fn join(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RaftHandle {
    fn drop(&mut self) {
        self.join();
    }
}

/// Points in the Ready loop where a test crashes the node (its thread returns, dropping all that
/// is not written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    AfterSend,
    AfterPersist,
    AfterApply,
    AfterAdvance,
}

/// Starts a node on its own thread.
pub fn start(
    settings: RaftSettings,
    inputs: (Sender<Input>, Receiver<Input>),
    transport: Box<dyn Transport>,
) -> anyhow::Result<RaftHandle> {
    start_with_crash(settings, inputs, transport, None)
}

/// [`start`], crashing at `crash`'s point once its flag is set and the point is reached with a
/// committed entry to apply (tests).
pub fn start_with_crash(
    settings: RaftSettings,
    (tx, rx): (Sender<Input>, Receiver<Input>),
    transport: Box<dyn Transport>,
    crash: Option<(CrashPoint, Arc<AtomicBool>)>,
) -> anyhow::Result<RaftHandle> {
    anyhow::ensure!(settings.id != 0, "a coordinator's raft id must not be 0");
    let storage = DiskStorage::open(&settings.dir, &settings.peers, settings.join)?;
    let config = raft::Config {
        id: settings.id,
        election_tick: settings.election_ticks,
        heartbeat_tick: settings.heartbeat_ticks,
        applied: storage.applied().index,
        check_quorum: true,
        pre_vote: true,
        read_only_option: ReadOnlyOption::Safe,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        ..Default::default()
    };
    config.validate()?;
    let logger = slog::Logger::root(TracingDrain, slog::o!("raft_id" => settings.id));
    let raw = RawNode::new(&config, storage, &logger)?;
    let status = Node::status_of(&raw, 0, None);
    let (status_tx, status_rx) = watch::channel(status);
    let stop = Arc::new(AtomicBool::new(false));
    let node = Node {
        raw,
        transport,
        inputs: rx,
        status: status_tx,
        settings,
        pending: Vec::new(),
        snapshots_received: 0,
        crash,
        stop: stop.clone(),
    };
    let thread = std::thread::Builder::new().name(format!("raft-{}", node.settings.id)).spawn(move || node.run())?;
    Ok(RaftHandle { inputs: tx, status: status_rx, stop, thread: Some(thread) })
}

struct Pending {
    index: u64,
    term: u64,
    /// A membership change (raft turns one proposed while another is pending into an empty entry).
    membership: bool,
    reply: Sender<Result<(), ProposeError>>,
}

struct Node {
    raw: RawNode<DiskStorage>,
    transport: Box<dyn Transport>,
    inputs: Receiver<Input>,
    status: watch::Sender<RaftStatus>,
    settings: RaftSettings,
    pending: Vec<Pending>,
    snapshots_received: u64,
    crash: Option<(CrashPoint, Arc<AtomicBool>)>,
    /// Set when the handle stops the node.
    stop: Arc<AtomicBool>,
}

/// Stops the Ready loop where it is.
struct Crashed;

impl Node {
    fn run(mut self) {
        let mut next_tick = Instant::now() + self.settings.tick;
        let stopped = loop {
            if self.stop.load(Ordering::SeqCst) {
                break None;
            }
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.inputs.recv_timeout(wait) {
                Ok(input) => self.handle(input),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break None,
            }
            while let Ok(input) = self.inputs.try_recv() {
                self.handle(input);
            }
            if Instant::now() >= next_tick {
                self.raw.tick();
                next_tick += self.settings.tick;
            }
            match self.on_ready() {
                Ok(()) => {}
                Err(Ok(Crashed)) => return,
                Err(Err(e)) => break Some(e.to_string()),
            }
            self.publish(None);
        };
        if let Some(why) = &stopped {
            warn!(raft_id = self.settings.id, error = %why, "raft storage failed; this coordinator stops taking part");
        }
        self.fail_pending(|| ProposeError::Stopped(stopped.clone().unwrap_or_else(|| "shutting down".into())));
        self.publish(stopped.clone());
        // A stopped node keeps answering, so that callers hear why instead of waiting, until its
        // handle stops it.
        if stopped.is_some() {
            loop {
                if self.stop.load(Ordering::SeqCst) {
                    break;
                }
                let input = match self.inputs.recv_timeout(Duration::from_millis(100)) {
                    Ok(input) => input,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                };
                let why = ProposeError::Stopped(stopped.clone().unwrap_or_default());
                match input {
                    Input::Propose { reply, .. } | Input::ChangeMembers { reply, .. } => {
                        let _ = reply.send(Err(why));
                    }
                    Input::Applied { reply } => {
                        let _ = reply.send(self.raw.store().applied().clone());
                    }
                    Input::Step(_) | Input::Unreachable(_) => {}
                }
            }
        }
    }

    /// Leader, with an entry of its own term applied (so every entry of earlier terms too).
    fn leads(raw: &RawNode<DiskStorage>) -> bool {
        raw.raft.state == StateRole::Leader && raw.store().applied().term == raw.raft.term
    }

    fn status_of(raw: &RawNode<DiskStorage>, snapshots_received: u64, stopped: Option<String>) -> RaftStatus {
        let applied = raw.store().applied();
        let role = raw.raft.state;
        RaftStatus {
            id: raw.raft.id,
            role,
            leader: raw.raft.leader_id,
            term: raw.raft.term,
            commit: raw.raft.raft_log.committed,
            applied: applied.index,
            last_index: raw.raft.raft_log.last_index(),
            leading: Node::leads(raw) && stopped.is_none(),
            peers: applied.peers.clone(),
            matched: if role == StateRole::Leader {
                raw.raft.prs().iter().map(|(id, p)| (*id, (p.matched, p.recent_active || *id == raw.raft.id))).collect()
            } else {
                BTreeMap::new()
            },
            snapshots_received,
            stopped,
        }
    }

    fn publish(&mut self, stopped: Option<String>) {
        if self.raw.raft.state != StateRole::Leader {
            self.fail_pending(|| ProposeError::Lost);
        }
        self.send_status(stopped);
    }

    fn send_status(&mut self, stopped: Option<String>) {
        let status = Node::status_of(&self.raw, self.snapshots_received, stopped);
        self.status.send_if_modified(|s| {
            let changed = *s != status;
            *s = status;
            changed
        });
    }

    fn fail_pending(&mut self, why: impl Fn() -> ProposeError) {
        for p in self.pending.drain(..) {
            let _ = p.reply.send(Err(why()));
        }
    }

    fn not_leader(&self) -> Option<ProposeError> {
        if Node::leads(&self.raw) {
            return None;
        }
        let leader = self.raw.store().applied().peers.get(&self.raw.raft.leader_id).cloned();
        Some(ProposeError::NotLeader { leader })
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Step(m) => {
                if let Err(e) = self.raw.step(*m) {
                    tracing::debug!(raft_id = self.settings.id, error = %e, "raft message ignored");
                }
            }
            Input::Propose { command, reply } => {
                if let Some(e) = self.not_leader() {
                    let _ = reply.send(Err(e));
                    return;
                }
                let data = serde_json::to_vec(&command).expect("commands serialize");
                match self.raw.propose(Vec::new(), data) {
                    Ok(()) => self.pending.push(Pending {
                        index: self.raw.raft.raft_log.last_index(),
                        term: self.raw.raft.term,
                        membership: false,
                        reply,
                    }),
                    Err(e) => {
                        let _ = reply.send(Err(ProposeError::Stopped(format!("proposal dropped: {e}"))));
                    }
                }
            }
            Input::ChangeMembers { add, remove, reply } => {
                if let Some(e) = self.not_leader() {
                    let _ = reply.send(Err(e));
                    return;
                }
                let mut cc = ConfChange::default();
                let mut context = Vec::new();
                match (add, remove) {
                    (Some((id, address)), None) => {
                        cc.node_id = id;
                        cc.set_change_type(ConfChangeType::AddNode);
                        context = address.into_bytes();
                    }
                    (None, Some(id)) => {
                        cc.node_id = id;
                        cc.set_change_type(ConfChangeType::RemoveNode);
                    }
                    _ => {
                        let _ = reply.send(Err(ProposeError::Stopped("add one coordinator or remove one".into())));
                        return;
                    }
                }
                match self.raw.propose_conf_change(context, cc) {
                    Ok(()) => self.pending.push(Pending {
                        index: self.raw.raft.raft_log.last_index(),
                        term: self.raw.raft.term,
                        membership: true,
                        reply,
                    }),
                    Err(e) => {
                        let _ = reply.send(Err(ProposeError::Stopped(format!("membership change refused: {e}"))));
                    }
                }
            }
            Input::Applied { reply } => {
                let _ = reply.send(self.raw.store().applied().clone());
            }
            Input::Unreachable(id) => self.raw.report_unreachable(id),
        }
    }

    fn crash_at(&self, point: CrashPoint, applying: bool) -> Result<(), Result<Crashed, anyhow::Error>> {
        if applying && self.crash.as_ref().is_some_and(|(p, armed)| *p == point && armed.load(Ordering::SeqCst)) {
            info!(raft_id = self.settings.id, ?point, "crashing as the test asked");
            return Err(Ok(Crashed));
        }
        Ok(())
    }

    fn on_ready(&mut self) -> Result<(), Result<Crashed, anyhow::Error>> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        let applying = !ready.committed_entries().is_empty();
        self.transport.send(ready.take_messages(), &self.raw.store().applied().peers);
        self.crash_at(CrashPoint::AfterSend, applying)?;
        let snapshot = (!ready.snapshot().is_empty()).then(|| ready.snapshot().clone());
        let store = self.raw.mut_store();
        store.persist(snapshot.as_ref(), ready.entries(), ready.hs(), ready.must_sync()).map_err(Err)?;
        if snapshot.is_some() {
            self.snapshots_received += 1;
            info!(raft_id = self.settings.id, index = self.raw.store().applied().index, "caught up from a snapshot");
        }
        self.crash_at(CrashPoint::AfterPersist, applying)?;
        self.apply(ready.take_committed_entries()).map_err(Err)?;
        self.crash_at(CrashPoint::AfterApply, applying)?;
        self.transport.send(ready.take_persisted_messages(), &self.raw.store().applied().peers);
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            let mut hs = self.raw.store().hard_state().clone();
            hs.commit = commit;
            self.raw.mut_store().persist(None, &[], Some(&hs), false).map_err(Err)?;
        }
        self.transport.send(light.take_messages(), &self.raw.store().applied().peers);
        let applied_any = applying || !light.committed_entries().is_empty();
        self.apply(light.take_committed_entries()).map_err(Err)?;
        self.raw.advance_apply();
        self.crash_at(CrashPoint::AfterAdvance, applied_any)?;
        let store = self.raw.store();
        if store.log_len() > self.settings.compact_after && store.applied().index > store.first_index().unwrap_or(0) {
            self.raw.mut_store().compact().map_err(Err)?;
        }
        Ok(())
    }

    /// Applies committed entries in order and keeps the result in one write; answers the
    /// proposals they settle.
    fn apply(&mut self, entries: Vec<Entry>) -> anyhow::Result<()> {
        let Some(last) = entries.last() else { return Ok(()) };
        let (last_index, last_term) = (last.index, last.term);
        let mut applied = self.raw.store().applied().clone();
        // Per index: the entry's term, whether it changed the membership, and its outcome.
        let mut outcomes: BTreeMap<u64, (u64, bool, Result<(), ProposeError>)> = BTreeMap::new();
        for entry in &entries {
            let membership = entry.get_entry_type() != EntryType::EntryNormal;
            let outcome = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => Ok(()),
                EntryType::EntryNormal => match serde_json::from_slice::<MetaCommand>(&entry.data) {
                    Ok(command) => applied.state.apply(&command).map_err(|e| {
                        warn!(raft_id = self.settings.id, index = entry.index, error = %e, "a committed command is refused; skipped");
                        ProposeError::Refused(e)
                    }),
                    Err(e) => anyhow::bail!("raft entry {} is not a command this coordinator knows ({e}); upgrade it", entry.index),
                },
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&entry.data)?;
                    let conf = self.raw.apply_conf_change(&cc)?;
                    applied.voters = conf.get_voters().to_vec();
                    match cc.get_change_type() {
                        ConfChangeType::RemoveNode => {
                            applied.peers.remove(&cc.node_id);
                        }
                        _ => {
                            applied.peers.insert(cc.node_id, String::from_utf8_lossy(&entry.context).into_owned());
                        }
                    }
                    info!(raft_id = self.settings.id, voters = ?applied.voters, "coordinators changed");
                    Ok(())
                }
                EntryType::EntryConfChangeV2 => {
                    anyhow::bail!("raft entry {} is a joint membership change, which Eddy does not make", entry.index)
                }
            };
            outcomes.insert(entry.index, (entry.term, membership, outcome));
        }
        applied.index = last_index;
        applied.term = last_term;
        self.raw.mut_store().apply(applied)?;
        // Whoever hears that a change was applied reads a status that holds it.
        self.send_status(None);
        let mut waiting = Vec::new();
        for p in self.pending.drain(..) {
            match outcomes.get(&p.index) {
                Some((term, membership, _)) if *term == p.term && p.membership && !membership => {
                    let _ = p.reply.send(Err(ProposeError::MembershipBusy));
                }
                Some((term, _, outcome)) if *term == p.term => {
                    let _ = p.reply.send(outcome.clone());
                }
                Some(_) => {
                    let _ = p.reply.send(Err(ProposeError::Lost));
                }
                None if p.index <= last_index => {
                    let _ = p.reply.send(Err(ProposeError::Lost));
                }
                None => waiting.push(p),
            }
        }
        self.pending = waiting;
        Ok(())
    }
}

/// raft-rs logs through `slog`; this passes its lines on to `tracing`.
struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        let mut fields = KeyValues(String::new());
        let _ = slog::KV::serialize(values, record, &mut fields);
        let _ = slog::KV::serialize(&record.kv(), record, &mut fields);
        let message = record.msg().to_string();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::error!(target: "raft", fields = %fields.0, "{message}"),
            slog::Level::Warning => tracing::warn!(target: "raft", fields = %fields.0, "{message}"),
            slog::Level::Info => tracing::info!(target: "raft", fields = %fields.0, "{message}"),
            slog::Level::Debug | slog::Level::Trace => tracing::debug!(target: "raft", fields = %fields.0, "{message}"),
        }
        Ok(())
    }
}

struct KeyValues(String);

impl slog::Serializer for KeyValues {
    fn emit_arguments(&mut self, key: slog::Key, value: &std::fmt::Arguments) -> slog::Result {
        use std::fmt::Write;
        let _ = write!(self.0, "{}{key}={value}", if self.0.is_empty() { "" } else { " " });
        Ok(())
    }
}
