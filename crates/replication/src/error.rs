//! The one error type of `regatta-replication`, and its gRPC status.

use tonic::{Code, Status};

/// Errors of replication.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The node or its tables failed the request.
    #[error(transparent)]
    Server(#[from] regatta_server::Error),
    /// The Raft runtime failed the request.
    #[error(transparent)]
    Raft(#[from] regatta_multiraft::Error),
    /// The leader cluster answered with an error or could not be reached.
    #[error("the leader cluster: {0}")]
    Remote(Box<Status>),
    /// The leader cluster sent something this follower cannot use.
    #[error("the leader cluster sent {0}")]
    Protocol(String),
    /// The leader cluster is behind this follower.
    #[error("{0}")]
    LeaderBehind(String),
    /// The follower's copy is of a table since dropped and re-created
    /// under the same name.
    #[error("{0}")]
    Recreated(String),
}

impl From<Status> for Error {
    fn from(status: Status) -> Error {
        Error::Remote(Box::new(status))
    }
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        match error {
            Error::InvalidArgument(message) => Status::new(Code::InvalidArgument, message),
            Error::Server(error) => Status::from(error),
            Error::Raft(error) => Status::from(regatta_server::Error::Raft(error)),
            Error::Remote(status) => *status,
            Error::Protocol(message) => Status::new(Code::Internal, message),
            Error::LeaderBehind(message) | Error::Recreated(message) => {
                Status::new(Code::FailedPrecondition, message)
            }
        }
    }
}
