//! Counts of CNI calls on a node by verb and result, kept by the plugin next to its IPAM state
//! (`cni-stats.json`, under its own lock) and exported by the agent on `/metrics`.

use crate::file;
use nix::fcntl::{Flock, FlockArg};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

pub const STATS_FILE: &str = "cni-stats.json";
const LOCK_FILE: &str = "cni-stats.lock";
const TEMP_FILE: &str = "cni-stats.json.tmp";
/// The counts are a few hundred bytes; anything much larger is not theirs.
const MAX_LEN: u64 = 1 << 20;
/// Counting is best effort: a call never waits longer than this to count itself.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// verb → result (`ok` / `error`) → count.
pub type CniStats = BTreeMap<String, BTreeMap<String, u64>>;

/// Takes the counts' lock, waiting at most [`LOCK_WAIT`]; `None` when it cannot.
fn lock(dir: &Path) -> Option<Flock<File>> {
    let mut f = file::open_regular(
        &dir.join(LOCK_FILE),
        OpenOptions::new().create(true).truncate(false).write(true),
    )
    .ok()?;
    let started = Instant::now();
    loop {
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Some(l),
            Err((back, nix::Error::EWOULDBLOCK | nix::Error::EINTR))
                if started.elapsed() < LOCK_WAIT =>
            {
                f = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return None,
        }
    }
}

/// Adds one call. Best effort: a failure to count never fails (nor holds up) the call.
pub fn record(dir: &Path, verb: &str, ok: bool) {
    let Some(_lock) = lock(dir) else {
        return;
    };
    let mut stats = read(dir);
    *stats
        .entry(verb.to_string())
        .or_default()
        .entry(if ok { "ok" } else { "error" }.to_string())
        .or_default() += 1;
    let Ok(text) = serde_json::to_vec(&stats) else {
        return;
    };
    let tmp = dir.join(TEMP_FILE);
    // Whatever is at the temporary name (a killed call's leftover, a FIFO) is replaced.
    let _ = std::fs::remove_file(&tmp);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&text));
    if written.is_ok() {
        let _ = std::fs::rename(&tmp, dir.join(STATS_FILE));
    }
}

/// Removes the temporary copy of the counts a killed call left behind; true if there was one.
pub fn sweep_temporary(dir: &Path) -> bool {
    lock(dir).is_some() && std::fs::remove_file(dir.join(TEMP_FILE)).is_ok()
}

/// The counts so far (empty when none or unreadable).
pub fn read(dir: &Path) -> CniStats {
    file::read_regular(&dir.join(STATS_FILE), MAX_LEN)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_verb_and_result() {
        let dir = tempfile::tempdir().unwrap();
        record(dir.path(), "ADD", true);
        record(dir.path(), "ADD", true);
        record(dir.path(), "ADD", false);
        record(dir.path(), "DEL", true);
        let s = read(dir.path());
        assert_eq!(s["ADD"]["ok"], 2);
        assert_eq!(s["ADD"]["error"], 1);
        assert_eq!(s["DEL"]["ok"], 1);
        // A missing directory is not an error for the caller.
        record(&dir.path().join("nope"), "ADD", true);
    }

    #[test]
    fn a_stuck_lock_or_a_fifo_never_holds_a_call_up() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let held = lock(&d).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            record(&d, "ADD", true);
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("record waited on the lock without bound");
        drop(held);
        assert!(
            read(dir.path()).is_empty(),
            "nothing was counted while the lock was held"
        );
        let mode = nix::sys::stat::Mode::from_bits_truncate(0o600);
        nix::unistd::mkfifo(&dir.path().join(STATS_FILE), mode).unwrap();
        nix::unistd::mkfifo(&dir.path().join(TEMP_FILE), mode).unwrap();
        record(dir.path(), "DEL", true);
        assert_eq!(read(dir.path())["DEL"]["ok"], 1);
    }
}
