//! Errors at the edges, where what a user gave (a directory, a port, a store) cannot be used.
//! Each says what was wrong and what to do; callers that only report them turn them into text
//! with `?` (there is a `From` for `String`), tests and embedders can match on the variant.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("cannot read the log directory {}: {source} (pass --logs DIR with part-NNNNN.csv files)", path.display())]
    LogDirectory { path: PathBuf, source: io::Error },

    #[error("{} is named like a partition but is not a regular file; move it out of the log directory", path.display())]
    NotAPartition { path: PathBuf },

    #[error("cannot create output directory {}: {source} (choose a directory you can write with --out)", path.display())]
    OutputDirectory { path: PathBuf, source: io::Error },

    #[error(
        "the store {} has schema version {found}, this clickagg ({ours}) reads version {reads}; export it with the \
         clickagg that wrote it, or start a new store; it was left as it is",
        path.display()
    )]
    StoreVersion { path: PathBuf, found: String, ours: &'static str, reads: u32 },

    #[error("cannot serve on {address}: {source}{}", if source.kind() == io::ErrorKind::AddrInUse {
        " (another process holds the port; choose another with --serve HOST:PORT)"
    } else {
        ""
    })]
    Listen { address: String, source: io::Error },
}

impl From<EdgeError> for String {
    fn from(error: EdgeError) -> String {
        error.to_string()
    }
}

impl From<EdgeError> for io::Error {
    fn from(error: EdgeError) -> io::Error {
        let kind = match &error {
            EdgeError::LogDirectory { source, .. } | EdgeError::OutputDirectory { source, .. } | EdgeError::Listen { source, .. } => {
                source.kind()
            }
            _ => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, error.to_string())
    }
}
