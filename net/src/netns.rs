//! Network namespaces: entered only long enough to open a socket there (netavark's rule), always
//! on the calling thread, and always left again.

use nix::fcntl::OFlag;
use nix::sched::{setns, CloneFlags};
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
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
    #[error("{path} is not a network namespace: it is a {kind}, not a namespace file (nsfs)")]
    NotNsfs { path: PathBuf, kind: &'static str },
    #[error("returning to the original network namespace: {source}")]
    Restore {
        #[source]
        source: nix::Error,
    },
}

/// Opens a netns by path (`/run/netns/x`, `/proc/PID/ns/net`). The path must name an nsfs
/// file: it is opened without blocking (a FIFO there would wait for a writer forever) and its
/// filesystem checked before anything else is done with it.
pub fn open(path: &Path) -> Result<File, NetnsError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).bits())
        .open(path)
        .map_err(|source| {
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
        })?;
    let on_nsfs = fstatfs(&file)
        .map(|fs| fs.filesystem_type() == NSFS_MAGIC)
        .map_err(|source| NetnsError::Open {
            path: path.to_path_buf(),
            source: source.into(),
        })?;
    if !on_nsfs {
        let kind = file
            .metadata()
            .map(|m| crate::file::kind_of(m.file_type()))
            .unwrap_or("file of unknown kind");
        return Err(NetnsError::NotNsfs {
            path: path.to_path_buf(),
            kind,
        });
    }
    Ok(file)
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

/// Where named namespaces live (iproute2's convention, so `ip netns` sees ours and we see its).
pub const NETNS_RUN_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NamedNetnsError {
    #[error("network namespace {name} already exists")]
    Exists { name: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {path}: {source}")]
    Sys {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("the thread creating network namespace {name} panicked")]
    Thread { name: String },
}

/// The path of the named namespace `name`.
pub fn named_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Makes `/run/netns` a shared mount point, as `ip netns add` does, so that a namespace mounted
/// there later is visible in every mount namespace that shares it.
fn prepare_run_dir() -> Result<(), NamedNetnsError> {
    use nix::mount::{mount, MsFlags};
    let dir = Path::new(NETNS_RUN_DIR);
    std::fs::create_dir_all(dir).map_err(|source| NamedNetnsError::Io {
        op: "creating",
        path: dir.into(),
        source,
    })?;
    let shared = |dir: &Path| {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared(dir) {
        Ok(()) => Ok(()),
        // Not a mount point yet: bind it onto itself first.
        Err(nix::Error::EINVAL) => mount(
            Some(dir),
            dir,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .and_then(|()| shared(dir))
        .map_err(|source| NamedNetnsError::Sys {
            op: "making a shared mount of",
            path: dir.into(),
            source,
        }),
        Err(source) => Err(NamedNetnsError::Sys {
            op: "making a shared mount of",
            path: dir.into(),
            source,
        }),
    }
}

/// Creates the named network namespace `name` (like `ip netns add`), with `lo` down. Nothing is
/// left behind when it fails.
pub fn create_named(name: &str) -> Result<PathBuf, NamedNetnsError> {
    prepare_run_dir()?;
    let path = named_path(name);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(NamedNetnsError::Exists { name: name.into() })
        }
        Err(source) => {
            return Err(NamedNetnsError::Io {
                op: "creating",
                path,
                source,
            })
        }
    }
    // A fresh thread unshares its own network namespace and pins it by a bind mount; the thread
    // then ends, and the process's other threads were never moved.
    let target = path.clone();
    let made = std::thread::spawn(move || -> Result<(), NamedNetnsError> {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|source| NamedNetnsError::Sys {
            op: "unsharing a network namespace for",
            path: target.clone(),
            source,
        })?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|source| NamedNetnsError::Sys {
            op: "bind-mounting a network namespace on",
            path: target.clone(),
            source,
        })
    })
    .join()
    .unwrap_or_else(|_| Err(NamedNetnsError::Thread { name: name.into() }));
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

/// Removes the named network namespace `name` (like `ip netns delete`); true if it was there.
/// The namespace itself ends when its last process and link reference is gone.
pub fn remove_named(name: &str) -> Result<bool, NamedNetnsError> {
    let path = named_path(name);
    if !path.exists() {
        return Ok(false);
    }
    match nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(source) => {
            return Err(NamedNetnsError::Sys {
                op: "unmounting",
                path,
                source,
            })
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(source) => Err(NamedNetnsError::Io {
            op: "removing",
            path,
            source,
        }),
    }
}

/// Names of the named namespaces that start with `prefix`.
pub fn list_named(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_RUN_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_namespace_files_open() {
        assert!(open(Path::new("/proc/self/ns/net")).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // A FIFO opened for reading would wait for a writer; this must return at once.
        let (tx, rx) = std::sync::mpsc::channel();
        let f = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(open(&f).map(|_| ()).map_err(|e| e.to_string()));
        });
        let e = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("opening a FIFO as a netns blocked")
            .unwrap_err();
        assert!(e.contains("not a network namespace: it is a FIFO"), "{e}");
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"").unwrap();
        let e = open(&plain).unwrap_err();
        assert!(
            matches!(
                e,
                NetnsError::NotNsfs {
                    kind: "regular file",
                    ..
                }
            ),
            "{e}"
        );
        let e = open(&dir.path().join("gone")).unwrap_err();
        assert!(matches!(e, NetnsError::Missing { .. }), "{e}");
    }
}
