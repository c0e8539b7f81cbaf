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
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        match error {
            Error::InvalidArgument(message) => Status::new(Code::InvalidArgument, message),
            Error::Server(error) => Status::from(error),
            Error::Raft(error) => Status::from(regatta_server::Error::Raft(error)),
        }
    }
}
