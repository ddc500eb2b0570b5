//! Task errors. Each says whose fault it is and whether retrying can help, so the coordinator can
//! decide between restarting and failing a job without parsing strings.

/// Who caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The job's spec or data: retrying the same input fails the same way.
    User,
    /// An external system (a sink, a broker): retrying later may succeed.
    External,
    /// Eddy itself (a bug or a lost peer): a restart may help.
    Internal,
}

/// An error that stops a task.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct TaskError {
    /// Whose fault it is.
    pub blame: Blame,
    /// What happened, and what to do when the user can act.
    pub message: String,
}

impl TaskError {
    /// An error caused by the job's spec or data.
    pub fn user(message: impl Into<String>) -> TaskError {
        TaskError { blame: Blame::User, message: message.into() }
    }
    /// An error in an external system.
    pub fn external(message: impl Into<String>) -> TaskError {
        TaskError { blame: Blame::External, message: message.into() }
    }
    /// An error of Eddy's own.
    pub fn internal(message: impl Into<String>) -> TaskError {
        TaskError { blame: Blame::Internal, message: message.into() }
    }
    /// Whether a retry (restart) can help.
    pub fn retryable(&self) -> bool {
        self.blame != Blame::User
    }
}

/// Result of task work.
pub type Result<T> = std::result::Result<T, TaskError>;
