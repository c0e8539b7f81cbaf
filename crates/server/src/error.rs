//! The one error type of `regatta-server`, and its gRPC status.

use tonic::{Code, Status};

/// Errors of the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot work.
    #[error("configuration: {0}")]
    Config(String),
    /// Storage could not be opened or used.
    #[error("storage: {0}")]
    Storage(String),
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request is over a configured limit.
    #[error("{0}")]
    TooLarge(String),
    /// No such table.
    #[error("table {0:?} does not exist")]
    TableNotFound(String),
    /// The table exists already.
    #[error("table {0:?} already exists")]
    TableExists(String),
    /// A revision that is not the current one.
    #[error("{0}")]
    Revision(String),
    /// The cluster cannot serve now.
    #[error("{0}")]
    Unavailable(String),
    /// The request cannot be served by this kind of cluster.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The Raft runtime refused or failed the request.
    #[error(transparent)]
    Raft(#[from] regatta_multiraft::Error),
    /// The server does not offer what the request needs.
    #[error("{0}")]
    Unimplemented(String),
    /// An admin operation without the right token.
    #[error("{0}")]
    Unauthenticated(String),
    /// The leader cluster answered a forwarded write with an error.
    #[error("the leader cluster: {message}")]
    Forwarded {
        /// Its gRPC status code.
        code: Code,
        /// Its message.
        message: String,
    },
    /// The request took longer than the server waits for it.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A bug: something that should not happen.
    #[error("internal: {0}")]
    Internal(String),
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        use regatta_multiraft::Error as Raft;
        let code = match &error {
            Error::Config(_) | Error::Storage(_) | Error::Internal(_) => Code::Internal,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::TooLarge(_) => Code::ResourceExhausted,
            Error::TableNotFound(_) => Code::NotFound,
            Error::TableExists(_) => Code::AlreadyExists,
            Error::Revision(_) => Code::OutOfRange,
            Error::Unavailable(_) => Code::Unavailable,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Forwarded { code, .. } => *code,
            Error::Raft(raft) => match raft {
                Raft::Timeout { .. } | Raft::OutcomeUnknown(_) => Code::DeadlineExceeded,
                Raft::NotLeader { .. } | Raft::Busy(_) | Raft::Dropped(_) => Code::Unavailable,
                Raft::Unsent { .. } => Code::Unavailable,
                Raft::GroupStopped { .. } | Raft::UnknownGroup(_) => Code::Unavailable,
                Raft::AlreadyApplied { .. } => Code::Unknown,
                Raft::Raft { source, .. } => match source {
                    regatta_raft::Error::NotLeader { .. }
                    | regatta_raft::Error::TransferInProgress { .. }
                    | regatta_raft::Error::Removed => Code::Unavailable,
                    regatta_raft::Error::UncommittedSizeExceeded { .. }
                    | regatta_raft::Error::ApplyBacklog { .. }
                    | regatta_raft::Error::LeaderOverloaded { .. }
                    | regatta_raft::Error::TooManyPendingReads { .. } => Code::ResourceExhausted,
                    regatta_raft::Error::InvalidProposal(_) => Code::InvalidArgument,
                    regatta_raft::Error::ConfChangeRefused { .. }
                    | regatta_raft::Error::TransferRefused { .. } => Code::FailedPrecondition,
                    _ => Code::Internal,
                },
                _ => Code::Internal,
            },
        };
        Status::new(code, error.to_string())
    }
}
