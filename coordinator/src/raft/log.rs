//! The [`MetaLog`] of a replicated coordinator: each command is proposed to the Raft node and the
//! coordinator's loop waits until it is committed and applied there.

use std::sync::mpsc::{channel, Sender};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::node::Input;
use crate::meta::{MetaCommand, MetaError, MetaLog, MetaState};

/// Proposes through a Raft node. After a failure (leadership lost, no quorum, a storage error)
/// it refuses everything and cancels `failed`: the coordinator's loop has applied a change the
/// cluster may not hold, so it stops and, if this coordinator still leads, a new loop starts from
/// the replicated state.
pub struct RaftLog {
    inputs: Sender<Input>,
    failed: CancellationToken,
    timeout: Duration,
}

impl RaftLog {
    /// A log on the node that reads `inputs`; `failed` is cancelled at its first failure.
    pub fn new(inputs: Sender<Input>, failed: CancellationToken, timeout: Duration) -> RaftLog {
        RaftLog { inputs, failed, timeout }
    }

    fn propose(&self, command: &MetaCommand) -> Result<(), String> {
        if self.failed.is_cancelled() {
            return Err("this coordinator has stopped leading".into());
        }
        let (reply, answer) = channel();
        self.inputs.send(Input::Propose { command: command.clone(), reply }).map_err(|_| "the raft node has stopped".to_string())?;
        let wait = || answer.recv_timeout(self.timeout);
        // The loop's thread waits; on a multi-threaded runtime its other tasks move elsewhere.
        let answered = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
            _ => wait(),
        };
        match answered {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no majority of coordinators committed the change within {} s", self.timeout.as_secs())),
        }
    }
}

impl MetaLog for RaftLog {
    fn append(&mut self, command: &MetaCommand, _: &MetaState) -> Result<(), MetaError> {
        self.propose(command).map_err(|e| {
            self.failed.cancel();
            MetaError::Storage(e)
        })
    }
}
