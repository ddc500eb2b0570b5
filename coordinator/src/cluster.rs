//! The workers the coordinator knows: registrations and their sessions, signs of life, the
//! failure detector's verdicts, and where free slots are. All of it is soft state: a restarted
//! coordinator (or a newly elected leader) hears it again as workers register.
//!
//! Which slots are taken is the jobs' business; the methods that need it are given the slots the
//! jobs hold, one entry per slot (a worker named twice holds two).

use std::collections::BTreeMap;
use std::time::Duration;

use eddy_proto::{CoordinatorMessage, WorkerView};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Status;
use tracing::{info, warn};

use crate::job::Orders;
use crate::{now_ms, older_than_the_latest};

/// Orders to one worker's control stream.
pub type WorkerSender = mpsc::Sender<Result<CoordinatorMessage, Status>>;

/// Lost workers still listed, the latest ones.
const LOST_WORKERS_KEPT: usize = 32;

/// A registered worker.
pub struct Worker {
    pub data_address: String,
    pub slots: u32,
    /// Tells this registration's messages from an earlier one's.
    pub session: u64,
    orders: WorkerSender,
    last_heartbeat: Instant,
    last_heartbeat_ms: i64,
    /// Why it was declared lost; `None` while alive.
    pub lost: Option<String>,
}

impl Worker {
    /// Whether its control stream is still open (a worker that died may not have been heard
    /// leaving yet).
    pub fn connected(&self) -> bool {
        !self.orders.is_closed()
    }
}

/// The registry of workers.
pub struct Cluster {
    workers: BTreeMap<String, Worker>,
    next_session: u64,
}

impl Default for Cluster {
    fn default() -> Cluster {
        Cluster { workers: BTreeMap::new(), next_session: 1 }
    }
}

impl Cluster {
    /// The worker, alive or lost.
    pub fn get(&self, id: &str) -> Option<&Worker> {
        self.workers.get(id)
    }

    /// The worker, if it is alive.
    pub fn live(&self, id: &str) -> Option<&Worker> {
        self.workers.get(id).filter(|w| w.lost.is_none())
    }

    /// Registers `id` under a new session (replacing an earlier registration, which the caller
    /// declares lost first if it was alive) and returns the session.
    pub fn register(&mut self, id: String, slots: u32, data_address: String, orders: WorkerSender) -> u64 {
        let session = self.next_session;
        self.next_session += 1;
        info!(worker_id = %id, slots, %data_address, session, "worker registered");
        let worker =
            Worker { data_address, slots, session, orders, last_heartbeat: Instant::now(), last_heartbeat_ms: now_ms(), lost: None };
        self.workers.insert(id, worker);
        session
    }

    /// Whether `session` is the live registration of `id`.
    pub fn is_current(&self, id: &str, session: u64) -> bool {
        self.live(id).is_some_and(|w| w.session == session)
    }

    /// Records a sign of life; false for a stale session or a worker already declared lost.
    pub fn touch(&mut self, id: &str, session: u64) -> bool {
        match self.workers.get_mut(id) {
            Some(w) if w.session == session && w.lost.is_none() => {
                w.last_heartbeat = Instant::now();
                w.last_heartbeat_ms = now_ms();
                true
            }
            _ => false,
        }
    }

    /// Live workers silent for longer than `timeout`, with how long.
    pub fn silent(&self, timeout: Duration) -> Vec<(String, Duration)> {
        self.workers
            .iter()
            .filter(|(_, w)| w.lost.is_none() && w.last_heartbeat.elapsed() > timeout)
            .map(|(id, w)| (id.clone(), w.last_heartbeat.elapsed()))
            .collect()
    }

    /// Declares `id` lost: it stays listed with `cause` (the latest few lost workers do), and its
    /// control stream is closed, which tells a worker that is alive but was cut off to drop its
    /// tasks and register again. False if it is not known.
    pub fn mark_lost(&mut self, id: &str, cause: &str) -> bool {
        let lost = self.workers.iter().filter(|(other, w)| w.lost.is_some() && other.as_str() != id);
        for old in older_than_the_latest(lost.map(|(id, w)| (w.last_heartbeat, id.clone())).collect(), LOST_WORKERS_KEPT - 1) {
            self.workers.remove(&old);
        }
        let Some(w) = self.workers.get_mut(id) else { return false };
        warn!(worker_id = %id, %cause, "worker lost");
        w.lost = Some(cause.to_string());
        let _ = w.orders.try_send(Err(Status::unavailable(format!("declared lost: {cause}"))));
        true
    }

    /// Sends each order to its worker if that is alive; the workers not reached (lost, or their
    /// stream full or closed).
    pub fn send_all(&self, orders: Orders) -> Vec<String> {
        let mut unreached = Vec::new();
        for (id, order) in orders {
            let sent = self.live(&id).is_some_and(|w| w.orders.try_send(Ok(CoordinatorMessage { msg: Some(order) })).is_ok());
            if !sent {
                unreached.push(id);
            }
        }
        unreached
    }

    /// Live workers.
    pub fn alive(&self) -> usize {
        self.workers.values().filter(|w| w.lost.is_none()).count()
    }

    /// Free slots per live worker, given the slots the jobs hold.
    pub fn free_slots<'a>(&self, held: impl IntoIterator<Item = &'a String>) -> BTreeMap<String, u32> {
        let mut free: BTreeMap<String, u32> =
            self.workers.iter().filter(|(_, w)| w.lost.is_none()).map(|(id, w)| (id.clone(), w.slots)).collect();
        for w in held {
            if let Some(f) = free.get_mut(w) {
                *f = f.saturating_sub(1);
            }
        }
        free
    }

    /// Picks `needed` free slots, spread across workers: one from each worker in turn (most free
    /// first); `None` when there are not enough.
    pub fn place<'a>(&self, needed: usize, held: impl IntoIterator<Item = &'a String>) -> Option<Vec<String>> {
        let mut free: Vec<(String, u32)> = self.free_slots(held).into_iter().filter(|(_, f)| *f > 0).collect();
        free.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut picked = Vec::with_capacity(needed);
        while picked.len() < needed {
            let before = picked.len();
            for (id, f) in free.iter_mut().filter(|(_, f)| *f > 0) {
                if picked.len() == needed {
                    break;
                }
                picked.push(id.clone());
                *f -= 1;
            }
            if picked.len() == before {
                return None;
            }
        }
        Some(picked)
    }

    /// Every worker listed, for `eddy workers`.
    pub fn views<'a>(&self, held: impl IntoIterator<Item = &'a String>) -> Vec<WorkerView> {
        let free = self.free_slots(held);
        self.workers
            .iter()
            .map(|(id, w)| WorkerView {
                worker_id: id.clone(),
                data_address: w.data_address.clone(),
                slots: w.slots,
                slots_used: w.slots - free.get(id).copied().unwrap_or(w.slots),
                state: match &w.lost {
                    None => "alive".to_string(),
                    Some(cause) => format!("lost: {cause}"),
                },
                last_heartbeat_ms: w.last_heartbeat_ms,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(workers: &[(&str, u32)]) -> (Cluster, Vec<mpsc::Receiver<Result<CoordinatorMessage, Status>>>) {
        let mut c = Cluster::default();
        let mut streams = Vec::new();
        for (id, slots) in workers {
            let (tx, rx) = mpsc::channel(4);
            c.register(id.to_string(), *slots, format!("{id}:1"), tx);
            streams.push(rx);
        }
        (c, streams)
    }

    /// Slots are taken one per worker in turn, the workers with most free first; held and lost
    /// ones are not offered.
    #[test]
    fn placement_spreads_over_the_free_slots_of_live_workers() {
        let (mut c, mut streams) = cluster(&[("a", 2), ("b", 3), ("c", 1)]);
        let held = ["b".to_string()];
        assert_eq!(c.place(4, &held).unwrap(), ["a", "b", "c", "a"]);
        assert_eq!(c.place(6, &held), None);
        assert!(c.mark_lost("a", "gone"));
        assert!(matches!(streams[0].try_recv(), Ok(Err(s)) if s.message() == "declared lost: gone"));
        assert_eq!(c.place(4, &held), None);
        assert_eq!(c.place(3, &held).unwrap(), ["b", "c", "b"]);
        assert_eq!(c.alive(), 2);
        let views = c.views(&held);
        assert_eq!(
            views.iter().map(|v| (v.slots_used, v.state.as_str())).collect::<Vec<_>>(),
            [(0, "lost: gone"), (1, "alive"), (0, "alive")]
        );
    }

    /// A message from an earlier registration, or from a worker declared lost, is not a sign of
    /// life.
    #[test]
    fn only_the_current_session_of_a_live_worker_counts() {
        let (mut c, _streams) = cluster(&[("a", 1)]);
        let first = c.get("a").unwrap().session;
        let (tx, _rx) = mpsc::channel(1);
        let second = c.register("a".into(), 1, "a:2".into(), tx);
        assert!(!c.touch("a", first) && c.touch("a", second));
        assert!(c.is_current("a", second));
        c.mark_lost("a", "silent");
        assert!(!c.touch("a", second) && !c.is_current("a", second));
        let renew = Orders::to("a", eddy_proto::coordinator_message::Msg::Renew(eddy_proto::Renew {}));
        assert_eq!(c.send_all(renew), ["a"], "a lost worker is sent nothing");
    }
}
