//! Counts of CNI calls on a node by verb and result, kept by the plugin next to its IPAM state
//! (`cni-stats.json`, under its own lock) and exported by the agent on `/metrics`.

use nix::fcntl::{Flock, FlockArg};
use std::collections::BTreeMap;
use std::path::Path;

pub const STATS_FILE: &str = "cni-stats.json";
const LOCK_FILE: &str = "cni-stats.lock";

/// verb → result (`ok` / `error`) → count.
pub type CniStats = BTreeMap<String, BTreeMap<String, u64>>;

/// Adds one call. Best effort: a failure to count never fails the call.
pub fn record(dir: &Path, verb: &str, ok: bool) {
    let Ok(lock_file) = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
    else {
        return;
    };
    let Ok(_lock) = Flock::lock(lock_file, FlockArg::LockExclusive) else {
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
    let tmp = dir.join(format!("{STATS_FILE}.tmp"));
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join(STATS_FILE));
    }
}

/// The counts so far (empty when none or unreadable).
pub fn read(dir: &Path) -> CniStats {
    std::fs::read(dir.join(STATS_FILE))
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
}
