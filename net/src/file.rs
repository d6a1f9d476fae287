//! Files written by someone else (the agent, an operator, a broken node): opened without ever
//! blocking, read only when they are regular files, and never read past a limit. A FIFO, a device
//! or a file that grows without end gets an error that names it instead of a call that hangs or
//! takes the node's memory.

use nix::fcntl::OFlag;
use std::fs::{File, FileType, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path} does not exist")]
    NotFound { path: PathBuf },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a regular file (it is a {kind})")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} is larger than {limit} bytes")]
    TooLarge { path: PathBuf, limit: u64 },
}

impl FileError {
    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                Self::NotFound { path: path.into() }
            } else {
                Self::Io {
                    op,
                    path: path.into(),
                    source,
                }
            }
        }
    }
}

/// What kind of file `t` is, in the words `ls -l` and `stat` use.
pub fn kind_of(t: FileType) -> &'static str {
    if t.is_file() {
        "regular file"
    } else if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_socket() {
        "socket"
    } else if t.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// Opens `path` with `options` plus `O_NONBLOCK` (so that opening a FIFO returns at once) and
/// `O_CLOEXEC`, and checks that what it opened is a regular file.
pub fn open_regular(path: &Path, options: &mut OpenOptions) -> Result<File, FileError> {
    let file = options
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).bits())
        .open(path)
        .map_err(|e| match std::fs::metadata(path) {
            // Opening a FIFO that nobody reads for writing fails (ENXIO): name what it is.
            Ok(m) if !m.is_file() => FileError::NotRegular {
                path: path.into(),
                kind: kind_of(m.file_type()),
            },
            _ => FileError::io("opening", path)(e),
        })?;
    let kind = file
        .metadata()
        .map_err(FileError::io("inspecting", path))?
        .file_type();
    if !kind.is_file() {
        return Err(FileError::NotRegular {
            path: path.into(),
            kind: kind_of(kind),
        });
    }
    Ok(file)
}

/// The contents of the regular file `path`, at most `limit` bytes.
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let file = open_regular(path, OpenOptions::new().read(true))?;
    read_to_limit(file, path, limit)
}

/// Reads `file` (opened from `path`) to its end, failing past `limit` bytes.
pub fn read_to_limit(file: File, path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let too_large = || FileError::TooLarge {
        path: path.into(),
        limit,
    };
    let len = file
        .metadata()
        .map_err(FileError::io("inspecting", path))?
        .len();
    if len > limit {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // One byte past the limit tells a file that grew while it was read from one that fits.
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(FileError::io("reading", path))?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_regular_file_within_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"hello").unwrap();
        assert_eq!(read_regular(&p, 5).unwrap(), b"hello");
        let e = read_regular(&p, 4).unwrap_err();
        assert!(matches!(e, FileError::TooLarge { limit: 4, .. }), "{e}");
        assert!(e.to_string().contains("larger than 4 bytes"), "{e}");
        let e = read_regular(&dir.path().join("nope"), 5).unwrap_err();
        assert!(matches!(e, FileError::NotFound { .. }), "{e}");
    }

    #[test]
    fn refuses_what_is_not_a_regular_file_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Opening a FIFO for reading would wait for a writer; this returns at once.
        let e = read_regular(&fifo, 100).unwrap_err();
        assert!(
            matches!(e, FileError::NotRegular { kind: "FIFO", .. }),
            "{e}"
        );
        let e = read_regular(Path::new("/dev/zero"), 100).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let e = read_regular(dir.path(), 100).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
        // For writing, a FIFO without a reader fails to open (ENXIO) rather than wait for one.
        let e = open_regular(&fifo, OpenOptions::new().write(true)).unwrap_err();
        assert!(
            matches!(e, FileError::NotRegular { kind: "FIFO", .. }),
            "{e}"
        );
    }
}
