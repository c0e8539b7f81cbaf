//! The one error type of `regatta-kv`.

/// Errors of the table store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The storage engine failed.
    #[error("table storage: {0}")]
    Storage(String),
    /// Bytes that should hold a request, result, record or snapshot do not.
    #[error("cannot decode {0}")]
    Decode(String),
    /// Reading or writing a snapshot stream failed.
    #[error("snapshot stream: {0}")]
    Io(#[from] std::io::Error),
}

impl From<fjall::Error> for Error {
    fn from(error: fjall::Error) -> Error {
        Error::Storage(error.to_string())
    }
}

impl From<fjall::LsmError> for Error {
    fn from(error: fjall::LsmError) -> Error {
        Error::Storage(error.to_string())
    }
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
