//! What the coordinator refuses, or cannot finish, as one type; it becomes a gRPC status at the
//! API's edge only ([`From`] into [`tonic::Status`]), so the loop and its types never speak gRPC.

use tonic::{Code, Status};

/// A request the coordinator refused or could not complete. Each message says what to do.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CoordinatorError {
    /// No job with this id (an ended one is forgotten after a while).
    #[error("no job `{0}`; `eddy jobs` lists the jobs")]
    NoSuchJob(String),
    /// No kept savepoint with this id.
    #[error("no savepoint `{0}`; `eddy status JOB` lists a job's savepoints")]
    NoSuchSavepoint(String),
    /// The request does not fit the job: a savepoint of another shape, a parallelism that does
    /// not plan.
    #[error("{0}")]
    Invalid(String),
    /// The cluster has too few free slots.
    #[error("{0}")]
    NoSlots(String),
    /// The job is not in a state that allows the request.
    #[error("{0}")]
    WrongState(String),
    /// Begun but not completed (a savepoint); the job itself is unaffected.
    #[error("{0}")]
    Aborted(String),
    /// The change could not be made durable (no majority of coordinators, a failing disk).
    #[error("{0}")]
    Unavailable(String),
    /// The coordinator stopped before answering.
    #[error("the coordinator is shutting down")]
    ShuttingDown,
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        let code = match &e {
            CoordinatorError::NoSuchJob(_) | CoordinatorError::NoSuchSavepoint(_) => Code::NotFound,
            CoordinatorError::Invalid(_) => Code::InvalidArgument,
            CoordinatorError::NoSlots(_) => Code::ResourceExhausted,
            CoordinatorError::WrongState(_) => Code::FailedPrecondition,
            CoordinatorError::Aborted(_) => Code::Aborted,
            CoordinatorError::Unavailable(_) | CoordinatorError::ShuttingDown => Code::Unavailable,
        };
        Status::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client sees the message as written, under the code that tells it whether to retry.
    #[test]
    fn each_error_becomes_the_status_a_client_expects() {
        let cases = [
            (CoordinatorError::NoSuchJob("j".into()), Code::NotFound, "no job `j`; `eddy jobs` lists the jobs"),
            (CoordinatorError::NoSuchSavepoint("s".into()), Code::NotFound, "no savepoint `s`; `eddy status JOB` lists a job's savepoints"),
            (CoordinatorError::Invalid("bad".into()), Code::InvalidArgument, "bad"),
            (CoordinatorError::NoSlots("full".into()), Code::ResourceExhausted, "full"),
            (CoordinatorError::WrongState("ended".into()), Code::FailedPrecondition, "ended"),
            (CoordinatorError::Aborted("timed out".into()), Code::Aborted, "timed out"),
            (CoordinatorError::Unavailable("no majority".into()), Code::Unavailable, "no majority"),
            (CoordinatorError::ShuttingDown, Code::Unavailable, "the coordinator is shutting down"),
        ];
        for (e, code, message) in cases {
            let status = Status::from(e);
            assert_eq!((status.code(), status.message()), (code, message));
        }
    }
}
