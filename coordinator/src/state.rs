//! Job and task states, and the rules for moving between them.

use std::fmt;

/// The life of a job. Every change is logged and kept in the job's history with its cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Accepted and planned, not yet placed.
    Created,
    /// Tasks sent to workers, not all running yet.
    Scheduling,
    /// Every task is running.
    Running,
    /// Recovering from a failure (from a checkpoint, once checkpoints exist).
    Restarting,
    /// A cancel was asked for; waiting for tasks to stop.
    Cancelling,
    /// Stopped on request.
    Cancelled,
    /// Stopped by an error or a lost worker.
    Failed,
    /// Every task reached the end of its input.
    Finished,
}

impl JobState {
    /// Whether the job is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Cancelled | JobState::Failed | JobState::Finished)
    }

    /// Whether the job holds slots.
    pub fn holds_slots(self) -> bool {
        !self.is_terminal() && self != JobState::Created
    }

    /// Whether `to` may follow `self`.
    pub fn can_become(self, to: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, to),
            // Restarting: the coordinator restarted before the first deployment.
            (Created, Scheduling | Restarting | Failed | Cancelled)
                | (Scheduling, Running | Finished | Failed | Cancelling | Restarting)
                | (Running, Finished | Failed | Cancelling | Restarting)
                | (Restarting, Scheduling | Failed | Cancelling)
                | (Cancelling, Cancelled | Failed)
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JobState::Created => "created",
            JobState::Scheduling => "scheduling",
            JobState::Running => "running",
            JobState::Restarting => "restarting",
            JobState::Cancelling => "cancelling",
            JobState::Cancelled => "cancelled",
            JobState::Failed => "failed",
            JobState::Finished => "finished",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::JobState::*;

    #[test]
    fn terminal_states_are_final() {
        for from in [Cancelled, Failed, Finished] {
            for to in [Created, Scheduling, Running, Restarting, Cancelling, Cancelled, Failed, Finished] {
                assert!(!from.can_become(to), "{from} -> {to}");
            }
        }
        assert!(Running.can_become(Failed));
        assert!(!Running.can_become(Created));
    }
}
