//! Network namespaces: entered only long enough to open a socket there (netavark's rule), always
//! on the calling thread, and always left again.

use nix::sched::{setns, CloneFlags};
use std::fs::File;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {path} does not exist")]
    Missing { path: PathBuf },
    #[error("opening network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a network namespace: {source}")]
    NotANetns {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("returning to the original network namespace: {source}")]
    Restore {
        #[source]
        source: nix::Error,
    },
}

/// Opens a netns by path (`/run/netns/x`, `/proc/PID/ns/net`).
pub fn open(path: &Path) -> Result<File, NetnsError> {
    File::open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            NetnsError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            NetnsError::Open {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// Runs `f` with the calling thread inside `target` (opened from `path`), then returns the thread
/// to the namespace it was in. If it cannot return, `f`'s output is dropped and the error says so:
/// the caller must then stop, since the thread is no longer where it thinks it is.
pub fn run_in<R>(target: &File, path: &Path, f: impl FnOnce() -> R) -> Result<R, NetnsError> {
    let home = open(Path::new("/proc/thread-self/ns/net"))?;
    setns(target, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::NotANetns {
        path: path.to_path_buf(),
        source,
    })?;
    let out = f();
    setns(&home, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Restore { source })?;
    Ok(out)
}
