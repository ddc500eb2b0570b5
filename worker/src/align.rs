//! Checkpoint barriers, aligned over a task's inputs as in Flink (the snapshots' storage is
//! `crate::checkpoint`).
//!
//! The coordinator asks source tasks to start checkpoint `n` (`TaskCommand::Trigger`). A source
//! task records its position, snapshots its chained operators and sends `Barrier(n)` down every
//! output channel, in order with its data. A task with several input channels aligns them
//! ([`Aligner`]): once barrier `n` has arrived on an input, the task stops reading that input until
//! barrier `n` has arrived on every other input too; then it snapshots its state, forwards the
//! barrier and reads all inputs again. So every snapshot reflects exactly the records before the
//! barrier, on every input. A blocked input is not buffered: its channel fills and its senders
//! wait (backpressure), as Flink blocks its channels, so alignment costs no memory.

use crate::batch::Message;
use crate::exchange::Delivery;

/// What [`Aligner::offer`] decided about a message.
#[derive(Debug)]
pub enum Offer {
    /// Process it now.
    Process(Delivery),
    /// A barrier, and nothing to do now: its input is blocked until the others deliver theirs (or
    /// it was stale, and is dropped).
    Absorbed,
    /// Barrier `n` has now arrived on every input: snapshot, then forward it.
    Aligned(u64),
}

/// Aligns checkpoint barriers over a task's input channels: it says which inputs to leave unread
/// ([`Aligner::blocked`]) and when a checkpoint's barrier has arrived on all of them.
#[derive(Debug)]
pub struct Aligner {
    ended: Vec<bool>,
    /// The checkpoint being aligned and which inputs delivered its barrier.
    aligning: Option<(u64, Vec<bool>)>,
    /// Newest checkpoint aligned, so that a stale barrier is ignored.
    last: u64,
}

impl Aligner {
    /// An aligner for `inputs` channels.
    pub fn new(inputs: usize) -> Aligner {
        Aligner { ended: vec![false; inputs], aligning: None, last: 0 }
    }

    /// Whether `input` must not be read now: it delivered the barrier being aligned, and what
    /// follows belongs to the next checkpoint.
    pub fn blocked(&self, input: usize) -> bool {
        self.aligning.as_ref().is_some_and(|(_, arrived)| arrived.get(input).copied().unwrap_or(false))
    }

    /// Decides what to do with a message of an input that is not [`blocked`](Aligner::blocked).
    pub fn offer(&mut self, d: Delivery) -> Offer {
        debug_assert!(!self.blocked(d.input), "a blocked input was read");
        match d.msg {
            Message::Barrier(id) => {
                if id <= self.last {
                    return Offer::Absorbed; // a barrier of an aborted or finished alignment: drop it
                }
                match &mut self.aligning {
                    // A newer barrier means the older checkpoint was given up upstream: align the new one.
                    Some((current, _)) if id > *current => self.aligning = Some((id, vec![false; self.ended.len()])),
                    Some((current, _)) if id < *current => return Offer::Absorbed,
                    Some(_) => {}
                    None => self.aligning = Some((id, vec![false; self.ended.len()])),
                }
                if let Some(a) = self.aligning.as_mut().and_then(|(_, arrived)| arrived.get_mut(d.input)) {
                    *a = true;
                }
                self.check_aligned().map_or(Offer::Absorbed, Offer::Aligned)
            }
            Message::End => {
                if let Some(e) = self.ended.get_mut(d.input) {
                    *e = true;
                }
                Offer::Process(d)
            }
            _ => Offer::Process(d),
        }
    }

    /// After an input ended: whether that completed the current alignment.
    pub fn after_end(&mut self) -> Option<u64> {
        self.check_aligned()
    }

    fn check_aligned(&mut self) -> Option<u64> {
        let (id, _) = self.aligning.take_if(|(_, arrived)| arrived.iter().zip(&self.ended).all(|(a, e)| *a || *e))?;
        self.last = id;
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Batch;

    fn d(input: usize, msg: Message) -> Delivery {
        Delivery { input, msg }
    }

    fn data(n: i64) -> Message {
        Message::Data(Batch::inserts(vec![vec![eddy_jobs::Value::Int(n)]]))
    }

    fn processed(o: Offer) -> Option<Message> {
        match o {
            Offer::Process(d) => Some(d.msg),
            _ => None,
        }
    }

    #[test]
    fn one_input_aligns_at_once() {
        let mut a = Aligner::new(1);
        assert!(matches!(a.offer(d(0, data(1))), Offer::Process(_)));
        assert!(matches!(a.offer(d(0, Message::Barrier(1))), Offer::Aligned(1)));
        assert!(!a.blocked(0));
        assert!(matches!(a.offer(d(0, data(2))), Offer::Process(_)));
    }

    #[test]
    fn an_input_past_an_early_barrier_is_blocked_until_the_others_deliver_theirs() {
        let mut a = Aligner::new(2);
        assert!(matches!(a.offer(d(0, Message::Barrier(1))), Offer::Absorbed));
        // Input 0 is past the barrier: its records belong to the next checkpoint and stay unread.
        assert!(a.blocked(0));
        // Input 1 is still before the barrier: its records go through.
        assert!(!a.blocked(1));
        assert_eq!(processed(a.offer(d(1, data(20)))), Some(data(20)));
        assert!(matches!(a.offer(d(1, Message::Barrier(1))), Offer::Aligned(1)));
        assert!(!a.blocked(0) && !a.blocked(1));
    }

    #[test]
    fn an_ended_input_counts_as_aligned() {
        let mut a = Aligner::new(2);
        assert!(matches!(a.offer(d(1, Message::End)), Offer::Process(_)));
        assert_eq!(a.after_end(), None);
        assert!(matches!(a.offer(d(0, Message::Barrier(3))), Offer::Aligned(3)));

        let mut b = Aligner::new(2);
        assert!(matches!(b.offer(d(0, Message::Barrier(4))), Offer::Absorbed));
        assert!(matches!(b.offer(d(1, Message::End)), Offer::Process(_)));
        assert_eq!(b.after_end(), Some(4));
    }

    #[test]
    fn a_newer_barrier_abandons_the_older_alignment() {
        let mut a = Aligner::new(2);
        assert!(matches!(a.offer(d(0, Message::Barrier(1))), Offer::Absorbed));
        // Checkpoint 1 was aborted upstream of input 1, which moved on to 2: input 0 is read
        // again (up to its own barrier 2), input 1 waits.
        assert!(matches!(a.offer(d(1, Message::Barrier(2))), Offer::Absorbed));
        assert!(!a.blocked(0) && a.blocked(1));
        assert!(matches!(a.offer(d(0, data(1))), Offer::Process(_)));
        assert!(matches!(a.offer(d(0, Message::Barrier(2))), Offer::Aligned(2)));
        // A late barrier of checkpoint 1 is ignored.
        assert!(matches!(a.offer(d(0, Message::Barrier(1))), Offer::Absorbed));
        assert!(!a.blocked(0));
    }

    /// A task blocked for an alignment holds nothing: the blocked input's channel fills and its
    /// sender waits, while the other input still flows (the old aligner queued without bound).
    #[tokio::test]
    async fn a_blocked_input_backpressures_its_sender_and_the_others_flow() {
        let inboxes = crate::exchange::Inboxes::default();
        let key = ("job".to_string(), 1, eddy_jobs::TaskId { vertex: 1, subtask: 0 });
        inboxes.fence("job", 1, [key.2]);
        let mut inputs = inboxes.receivers(&key, 2).unwrap();
        let (early, late) = (inboxes.sender(&key, 0, 2).unwrap(), inboxes.sender(&key, 1, 2).unwrap());
        let mut a = Aligner::new(2);
        early.send(d(0, Message::Barrier(1))).await.unwrap();
        let first = inputs.recv(|i| a.blocked(i)).await.unwrap();
        assert!(matches!(a.offer(first), Offer::Absorbed));
        // The early input's sender fills its channel, then waits.
        let flood = tokio::spawn(async move {
            for n in 0.. {
                early.send(d(0, data(n))).await.unwrap();
            }
        });
        for n in 0..100 {
            late.send(d(1, data(1000 + n))).await.unwrap();
            let next = inputs.recv(|i| a.blocked(i)).await.unwrap();
            assert_eq!(next.input, 1, "a blocked input was read");
            assert_eq!(processed(a.offer(next)), Some(data(1000 + n)));
        }
        assert!(!flood.is_finished());
        late.send(d(1, Message::Barrier(1))).await.unwrap();
        let next = inputs.recv(|i| a.blocked(i)).await.unwrap();
        assert!(matches!(a.offer(next), Offer::Aligned(1)));
        // Unblocked: the early input's records come, in their order.
        let next = inputs.recv(|i| a.blocked(i)).await.unwrap();
        assert_eq!((next.input, processed(a.offer(next))), (0, Some(data(0))));
        flood.abort();
    }
}
