//! Coordinators replicating their metadata with Raft (the `raft` crate, tikv/raft-rs).
//!
//! [`node`] runs one coordinator's Raft node on a thread of its own; [`storage`] keeps its log and
//! applied state in RocksDB; [`log::RaftLog`] is the [`crate::meta::MetaLog`] the leader's
//! coordinator loop writes through; [`transport`] carries raft messages between coordinators over
//! gRPC.

pub mod log;
pub mod node;
pub mod storage;
pub mod transport;

pub use node::{start, Input, ProposeError, RaftHandle, RaftSettings, RaftStatus, Transport};

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet, HashMap};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc::{channel, Sender};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use raft::prelude::Message;
    use raft::StateRole;

    use super::node::{start_with_crash, CrashPoint};
    use super::*;
    use crate::meta::{MetaCommand, MetaState};

    /// An in-memory network between nodes that can cut links, drop and delay messages.
    #[derive(Default)]
    struct Net {
        nodes: Mutex<HashMap<u64, Sender<Input>>>,
        /// Links cut, both directions listed.
        cut: Mutex<BTreeSet<(u64, u64)>>,
        /// Per mille of messages dropped, and the longest delay, decided from the seed.
        drop_per_mille: u64,
        max_delay_ms: u64,
        rng: Mutex<u64>,
    }

    impl Net {
        fn random(&self) -> u64 {
            let mut s = self.rng.lock().unwrap();
            // xorshift64*
            *s ^= *s >> 12;
            *s ^= *s << 25;
            *s ^= *s >> 27;
            s.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn deliver(&self, from: u64, m: Message) {
            if self.cut.lock().unwrap().contains(&(from, m.to)) || (self.drop_per_mille > 0 && self.random() % 1000 < self.drop_per_mille) {
                return;
            }
            let Some(tx) = self.nodes.lock().unwrap().get(&m.to).cloned() else { return };
            if self.max_delay_ms == 0 {
                let _ = tx.send(Input::Step(Box::new(m)));
                return;
            }
            let delay = Duration::from_millis(self.random() % self.max_delay_ms);
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                let _ = tx.send(Input::Step(Box::new(m)));
            });
        }

        /// Cuts `id` off from everyone else.
        fn isolate(&self, id: u64, all: &[u64]) {
            let mut cut = self.cut.lock().unwrap();
            for other in all.iter().filter(|o| **o != id) {
                cut.insert((id, *other));
                cut.insert((*other, id));
            }
        }

        fn heal(&self) {
            self.cut.lock().unwrap().clear();
        }
    }

    struct NetTransport {
        from: u64,
        net: Arc<Net>,
    }

    impl Transport for NetTransport {
        fn send(&mut self, messages: Vec<Message>, _: &BTreeMap<u64, String>) {
            for m in messages {
                self.net.deliver(self.from, m);
            }
        }
    }

    struct TestCluster {
        ids: Vec<u64>,
        dir: PathBuf,
        net: Arc<Net>,
        nodes: BTreeMap<u64, RaftHandle>,
        compact_after: u64,
        crash: Option<CrashPoint>,
        armed: HashMap<u64, Arc<AtomicBool>>,
        /// Every (term, leader) seen: never two leaders in one term.
        leaders: BTreeMap<u64, BTreeSet<u64>>,
    }

    impl TestCluster {
        fn new(name: &str, n: u64, net: Net, compact_after: u64, crash: Option<CrashPoint>) -> TestCluster {
            let dir = std::env::temp_dir().join(format!("eddy-raft-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let mut c = TestCluster {
                ids: (1..=n).collect(),
                dir,
                net: Arc::new(net),
                nodes: BTreeMap::new(),
                compact_after,
                crash,
                armed: HashMap::new(),
                leaders: BTreeMap::new(),
            };
            for id in c.ids.clone() {
                c.start(id);
            }
            c
        }

        fn start(&mut self, id: u64) {
            let peers = self.ids.iter().map(|i| (*i, format!("127.0.0.1:{}", 7000 + i))).collect();
            let mut settings = RaftSettings::new(id, peers, self.dir.join(id.to_string()));
            settings.tick = Duration::from_millis(20);
            settings.compact_after = self.compact_after;
            let (tx, rx) = channel();
            self.net.nodes.lock().unwrap().insert(id, tx.clone());
            let armed = self.armed.entry(id).or_default().clone();
            armed.store(false, Ordering::SeqCst);
            let crash = self.crash.map(|p| (p, armed));
            let transport = Box::new(NetTransport { from: id, net: self.net.clone() });
            self.nodes.insert(id, start_with_crash(settings, (tx, rx), transport, crash).unwrap());
        }

        fn stop(&mut self, id: u64) {
            self.net.nodes.lock().unwrap().remove(&id);
            if let Some(n) = self.nodes.remove(&id) {
                n.stop();
            }
        }

        fn status(&self, id: u64) -> RaftStatus {
            self.nodes[&id].status.borrow().clone()
        }

        fn observe(&mut self) {
            for id in self.nodes.keys().copied().collect::<Vec<_>>() {
                let s = self.status(id);
                if s.role == StateRole::Leader {
                    self.leaders.entry(s.term).or_default().insert(id);
                }
            }
            for (term, leaders) in &self.leaders {
                assert!(leaders.len() <= 1, "two leaders in term {term}: {leaders:?}");
            }
        }

        fn wait<T>(&mut self, what: &str, mut f: impl FnMut(&mut TestCluster) -> Option<T>) -> T {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                self.observe();
                if let Some(t) = f(self) {
                    return t;
                }
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }

        /// A node among `among` that leads, once one does.
        fn leader(&mut self, among: &[u64]) -> u64 {
            let among = among.to_vec();
            self.wait("a leader", |c| {
                among.iter().copied().find(|id| c.nodes.get(id).is_some_and(|n| !n.is_finished() && n.status.borrow().leading))
            })
        }

        fn propose(&self, id: u64, command: MetaCommand) -> Result<(), ProposeError> {
            let (reply, answer) = channel();
            let gone = || ProposeError::Stopped("crashed".into());
            self.nodes[&id].inputs.send(Input::Propose { command, reply }).map_err(|_| gone())?;
            // A node that crashes drops the reply.
            answer.recv_timeout(Duration::from_secs(20)).map_err(|_| gone())?
        }

        /// Proposes through whichever node leads, until one takes it.
        fn propose_somewhere(&mut self, command: MetaCommand) {
            let ids = self.nodes.keys().copied().collect::<Vec<_>>();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                let leader = self.leader(&ids);
                match self.propose(leader, command.clone()) {
                    Ok(()) => return,
                    Err(e @ (ProposeError::Lost | ProposeError::NotLeader { .. } | ProposeError::Stopped(_))) => {
                        eprintln!("node {leader} did not take {command:?}: {e}");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            panic!("no leader took {command:?}");
        }

        fn applied(&self, id: u64) -> MetaState {
            let (reply, answer) = channel();
            self.nodes[&id].inputs.send(Input::Applied { reply }).unwrap();
            answer.recv_timeout(Duration::from_secs(20)).unwrap().state
        }

        /// Waits until every running node holds the same state, in which checkpoint ids up to
        /// `next` are used. (A proposal whose answer was lost with its leader may or may not have
        /// taken effect, so the state is compared between nodes; a node that applied an entry twice
        /// would count one command more than the others.)
        fn agree(&mut self, next: u64) -> MetaState {
            self.wait("every node to apply the same commands", |c| {
                let states: Vec<MetaState> = c.nodes.keys().map(|id| c.applied(*id)).collect();
                let first = states[0].clone();
                let done = first.jobs.get("j").is_some_and(|j| j.next_checkpoint_id == next);
                (done && states.iter().all(|s| *s == first)).then_some(first)
            })
        }
    }

    impl Drop for TestCluster {
        fn drop(&mut self) {
            for id in self.nodes.keys().copied().collect::<Vec<_>>() {
                self.stop(id);
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn submitted() -> MetaCommand {
        MetaCommand::Submitted { job: crate::meta::tests::job("j") }
    }

    fn ids_used(next: u64) -> MetaCommand {
        MetaCommand::CheckpointIdsUsed { job_id: "j".into(), next }
    }

    fn run_through_leader_loss(name: &str, n: u64, net: Net) {
        let mut c = TestCluster::new(name, n, net, 1000, None);
        c.propose_somewhere(submitted());
        for i in 1..=20 {
            c.propose_somewhere(ids_used(i));
        }
        c.agree(20);
        let old = c.leader(&c.ids.clone());
        c.stop(old);
        let started = Instant::now();
        let rest: Vec<u64> = c.ids.iter().copied().filter(|i| *i != old).collect();
        let new = c.leader(&rest);
        assert_ne!(new, old);
        eprintln!("{n} nodes: node {new} leads {} ms after node {old} stopped", started.elapsed().as_millis());
        for i in 21..=30 {
            c.propose_somewhere(ids_used(i));
        }
        c.agree(30);
        // The old leader comes back from its disk and catches up as a follower.
        c.start(old);
        c.agree(30);
        assert_ne!(c.status(old).role, StateRole::Leader);
    }

    #[test]
    fn three_nodes_survive_the_loss_of_their_leader() {
        run_through_leader_loss("loss3", 3, Net::default());
    }

    #[test]
    fn five_nodes_survive_the_loss_of_their_leader() {
        run_through_leader_loss("loss5", 5, Net::default());
    }

    /// Messages dropped and delayed at random (the seed is printed; `EDDY_TEST_SEED` replays it).
    #[test]
    fn a_lossy_slow_network_loses_no_command() {
        let seed = std::env::var("EDDY_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| crate::now_ms() as u64 | 1);
        eprintln!("seed {seed} (EDDY_TEST_SEED={seed} replays it)");
        let net = Net { drop_per_mille: 100, max_delay_ms: 15, rng: Mutex::new(seed), ..Net::default() };
        run_through_leader_loss("lossy", 5, net);
    }

    #[test]
    fn a_leader_cut_off_steps_down_and_the_majority_goes_on() {
        let mut c = TestCluster::new("partition", 3, Net::default(), 1000, None);
        c.propose_somewhere(submitted());
        let old = c.leader(&c.ids.clone());
        let ids = c.ids.clone();
        c.net.isolate(old, &ids);
        // A write on the cut-off side while it still believes it leads: never answered as done.
        let (reply, zombie) = channel();
        c.nodes[&old].inputs.send(Input::Propose { command: ids_used(99), reply }).unwrap();
        let rest: Vec<u64> = ids.iter().copied().filter(|i| *i != old).collect();
        let new = c.leader(&rest);
        assert_ne!(new, old);
        // check_quorum: the old leader notices it hears from no majority and steps down.
        c.wait("the cut-off leader to step down", |c| (c.status(old).role != StateRole::Leader).then_some(()));
        let lost = zombie.recv_timeout(Duration::from_secs(20)).unwrap();
        assert!(matches!(lost, Err(ProposeError::Lost | ProposeError::NotLeader { .. })), "{lost:?}");
        let refused = c.propose(old, ids_used(99));
        assert!(matches!(refused, Err(ProposeError::NotLeader { .. })), "{refused:?}");
        for i in 1..=10 {
            c.propose(new, ids_used(i)).unwrap();
        }
        c.net.heal();
        c.agree(10);
        assert_eq!(c.applied(old).jobs["j"].next_checkpoint_id, 10, "the cut-off side's write never took effect");
    }

    #[test]
    fn a_follower_far_behind_catches_up_through_a_snapshot() {
        let mut c = TestCluster::new("snapshot", 3, Net::default(), 10, None);
        c.propose_somewhere(submitted());
        c.agree(1);
        let leader = c.leader(&c.ids.clone());
        let behind = *c.ids.iter().find(|i| **i != leader).unwrap();
        let ids = c.ids.clone();
        c.net.isolate(behind, &ids);
        for i in 1..=60 {
            c.propose(leader, ids_used(i)).unwrap();
        }
        c.net.heal();
        c.agree(60);
        assert!(c.status(behind).snapshots_received >= 1, "caught up through a snapshot: {:?}", c.status(behind));
        // And it restarts from that snapshot on its disk.
        c.stop(behind);
        c.start(behind);
        c.agree(60);
    }

    /// One membership change at a time: a second proposed while the first is pending is refused
    /// (raft would turn it into an empty entry), not reported done.
    #[test]
    fn a_second_membership_change_while_one_is_pending_is_refused() {
        let mut c = TestCluster::new("members", 3, Net::default(), 1000, None);
        let leader = c.leader(&c.ids.clone());
        let change = |add: u64| {
            let (reply, answer) = channel();
            let add = Some((add, format!("127.0.0.1:{}", 7000 + add)));
            c.nodes[&leader].inputs.send(Input::ChangeMembers { add, remove: None, reply }).unwrap();
            answer
        };
        let (first, second) = (change(4), change(5));
        assert_eq!(first.recv_timeout(Duration::from_secs(20)).unwrap(), Ok(()));
        assert_eq!(second.recv_timeout(Duration::from_secs(20)).unwrap(), Err(ProposeError::MembershipBusy));
        c.wait("coordinator 4 listed", |c| c.status(leader).peers.contains_key(&4).then_some(()));
        assert!(!c.status(leader).peers.contains_key(&5));
    }

    /// A node that crashes at any step of its Ready loop (as leader or as follower) comes back from
    /// its disk with nothing committed lost and nothing applied twice.
    #[test]
    fn a_node_restarts_from_disk_after_a_crash_at_each_step_of_the_ready_loop() {
        for point in [CrashPoint::AfterSend, CrashPoint::AfterPersist, CrashPoint::AfterApply, CrashPoint::AfterAdvance] {
            for crash_leader in [true, false] {
                let mut c = TestCluster::new(&format!("crash-{point:?}-{crash_leader}"), 3, Net::default(), 1000, Some(point));
                c.propose_somewhere(submitted());
                let leader = c.leader(&c.ids.clone());
                let victim = if crash_leader { leader } else { *c.ids.iter().find(|i| **i != leader).unwrap() };
                c.armed[&victim].store(true, Ordering::SeqCst);
                for i in 1..=5 {
                    c.propose_somewhere(ids_used(i));
                }
                c.wait("the crash", |c| c.nodes[&victim].is_finished().then_some(()));
                c.stop(victim);
                c.start(victim);
                for i in 6..=10 {
                    c.propose_somewhere(ids_used(i));
                }
                c.agree(10);
                eprintln!("{point:?}, leader {crash_leader}: recovered");
            }
        }
    }
}
