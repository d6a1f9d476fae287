//! Address allocation out of the node's subnet.
//!
//! State is one JSON file in the IPAM directory, read and rewritten (temp file, rename) under an
//! exclusive `flock`, so concurrent plugin calls serialise on it and a crash never leaves a torn
//! file. Allocations are keyed by (container id, interface name): a repeated ADD gets the same
//! address back and a repeated DEL is a no-op.
//!
//! Nothing here costs in proportion to the subnet's size: the search for a free address looks at
//! most at one more address than are allocated. The lock is waited for a bounded time, and the
//! files are opened without blocking and read only when they are regular and not too large, so
//! that no file put in the directory can make a call (and every call queued behind its lock) hang.

use crate::file::{self, FileError};
use ipnet::Ipv4Net;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sluice_policy::hostport::HostportEntry;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const STATE_FILE: &str = "allocations.json";
pub const LOCK_FILE: &str = "lock";
/// Where the state is written before it is renamed over [`STATE_FILE`].
pub const STATE_TEMP_FILE: &str = ".allocations.json.tmp";
/// The most of [`STATE_FILE`] that is read: some 50 000 allocations, far more than any node has.
pub const MAX_STATE_LEN: u64 = 16 << 20;
/// How long a call waits for another to let go of the lock. A call holds it for milliseconds (GC,
/// which removes links under it, for a little longer), so this much means the holder is stuck.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Who holds an address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Owner {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    /// `namespace/name` of the pod, when the runtime said (for people reading the file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

impl Owner {
    fn same_attachment(&self, other: &Owner) -> bool {
        self.container_id == other.container_id && self.ifname == other.ifname
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamState {
    /// The address handed out last; the next search starts after it so that a freed address is not
    /// reused at once (a stale connection to it would reach the wrong pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Ipv4Addr>,
    #[serde(default)]
    pub allocations: BTreeMap<Ipv4Addr, Owner>,
    /// The hostPort mappings of the attachments (CNI `runtimeConfig.portMappings`), kept in the
    /// same file under the same lock as the addresses: ADD admits a mapping and allocates an
    /// address in one locked step, and a state file from before hostPorts reads as none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostports: Vec<HostportEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("no free address in {subnet}: all {capacity} addresses are allocated")]
    Exhausted { subnet: Ipv4Net, capacity: u64 },
    #[error("IPAM directory {dir}: {op}: {source}")]
    Io {
        dir: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("IPAM: {source}")]
    File {
        #[source]
        source: FileError,
    },
    #[error("IPAM state {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("another call has held the IPAM lock {path} for over {}s; try again later", .waited.as_secs())]
    LockTimeout { path: PathBuf, waited: Duration },
}

/// The first and last address pods may get in `subnet`, if it has any: all but the network and
/// broadcast addresses. The network address is left for the node's own tunnel device.
fn host_range(subnet: Ipv4Net) -> Option<(u32, u32)> {
    let first = u32::from(subnet.network()).checked_add(1)?;
    let last = u32::from(subnet.broadcast()).checked_sub(1)?;
    (first <= last).then_some((first, last))
}

/// How many addresses pods may get in `subnet`.
pub fn capacity(subnet: Ipv4Net) -> u64 {
    host_range(subnet).map_or(0, |(first, last)| u64::from(last - first) + 1)
}

/// The addresses pods may get in `subnet`, in order (lazily: a /8 is not listed to be walked).
pub fn usable(subnet: Ipv4Net) -> impl Iterator<Item = Ipv4Addr> {
    let (first, last) = host_range(subnet).map_or((1, 0), |r| r);
    (first..=last).map(Ipv4Addr::from)
}

/// Picks the first free usable address after `last`, wrapping around the subnet. Pure.
///
/// Of any `n + 1` addresses in a row at most `n` can be among the `n` allocated, so the search
/// stops after that many: its cost follows the allocations, not the subnet's size.
pub fn choose(subnet: Ipv4Net, state: &IpamState) -> Option<Ipv4Addr> {
    let (first, last) = host_range(subnet)?;
    let span = u64::from(last - first) + 1;
    let start = state
        .last
        .map(u32::from)
        .filter(|l| (first..last).contains(l))
        .map_or(first, |l| l + 1);
    let taken = state
        .allocations
        .range(Ipv4Addr::from(first)..=Ipv4Addr::from(last))
        .count() as u64;
    (0..=taken.min(span - 1))
        .map(|i| Ipv4Addr::from(first + ((u64::from(start - first) + i) % span) as u32))
        .find(|a| !state.allocations.contains_key(a))
}

impl IpamState {
    /// The address `owner`'s attachment holds, if any.
    pub fn lookup(&self, owner: &Owner) -> Option<Ipv4Addr> {
        self.allocations
            .iter()
            .find(|(_, o)| o.same_attachment(owner))
            .map(|(ip, _)| *ip)
    }

    /// Gives `owner` an address in `subnet`: the one it already holds there, else a free one.
    /// Returns the address and whether it is new.
    pub fn allocate(
        &mut self,
        subnet: Ipv4Net,
        owner: Owner,
    ) -> Result<(Ipv4Addr, bool), IpamError> {
        if let Some(ip) = self.lookup(&owner).filter(|ip| subnet.contains(ip)) {
            return Ok((ip, false));
        }
        // The node's subnet changed since this attachment was made: its old address is useless.
        self.release(&owner);
        let ip = choose(subnet, self).ok_or(IpamError::Exhausted {
            subnet,
            capacity: capacity(subnet),
        })?;
        self.allocations.insert(ip, owner);
        self.last = Some(ip);
        Ok((ip, true))
    }

    /// Frees what `owner`'s attachment holds; returns the address it had.
    pub fn release(&mut self, owner: &Owner) -> Option<Ipv4Addr> {
        let ip = self.lookup(owner)?;
        self.allocations.remove(&ip);
        Some(ip)
    }
}

/// The on-disk store.
pub struct IpamStore {
    dir: PathBuf,
    lock_wait: Duration,
}

impl IpamStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            lock_wait: LOCK_WAIT,
        }
    }

    /// Waits at most `wait` for the lock instead of [`LOCK_WAIT`].
    pub fn with_lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> IpamError + '_ {
        move |source| IpamError::Io {
            dir: self.dir.clone(),
            op,
            source,
        }
    }

    /// Takes the lock (waiting at most the store's lock wait for another call to let go of it)
    /// and reads the state. The lock is held until the [`IpamLock`] is dropped, so a caller may
    /// act on the kernel while no other call can allocate.
    pub fn lock(&self) -> Result<IpamLock<'_>, IpamError> {
        std::fs::create_dir_all(&self.dir).map_err(self.io("create"))?;
        let path = self.dir.join(LOCK_FILE);
        let mut lock_file = file::open_regular(
            &path,
            OpenOptions::new().create(true).truncate(false).write(true),
        )
        .map_err(|source| IpamError::File { source })?;
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        let flock = loop {
            match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
                Ok(flock) => break flock,
                Err((f, nix::Error::EWOULDBLOCK | nix::Error::EINTR)) => {
                    if started.elapsed() >= self.lock_wait {
                        return Err(IpamError::LockTimeout {
                            path,
                            waited: self.lock_wait,
                        });
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                    lock_file = f;
                }
                Err((_, errno)) => return Err(self.io("lock")(errno.into())),
            }
        };
        let state = self.read_state()?;
        Ok(IpamLock {
            store: self,
            _flock: flock,
            saved: state.clone(),
            state,
        })
    }

    fn read_state(&self) -> Result<IpamState, IpamError> {
        let path = self.dir.join(STATE_FILE);
        let bytes = match file::read_regular(&path, MAX_STATE_LEN) {
            Ok(bytes) => bytes,
            Err(FileError::NotFound { .. }) => return Ok(IpamState::default()),
            Err(source) => return Err(IpamError::File { source }),
        };
        if bytes.is_empty() {
            return Ok(IpamState::default());
        }
        serde_json::from_slice(&bytes).map_err(|source| IpamError::Corrupt { path, source })
    }

    /// Runs `f` on the state under the lock, and writes the state back if `f` changed it.
    pub fn update<R>(&self, f: impl FnOnce(&mut IpamState) -> R) -> Result<R, IpamError> {
        let mut lock = self.lock()?;
        let out = f(&mut lock.state);
        lock.save()?;
        Ok(out)
    }

    /// A consistent read of the state.
    pub fn read(&self) -> Result<IpamState, IpamError> {
        Ok(self.lock()?.state)
    }

    /// Writes `state` to a fresh temporary file and renames it over the state. Called under the
    /// lock; whatever an earlier call that died left at the temporary name (or put there) is
    /// removed first, never written through.
    fn write(&self, state: &IpamState) -> Result<(), IpamError> {
        let path = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(STATE_TEMP_FILE);
        let bytes = serde_json::to_vec_pretty(state).map_err(|source| IpamError::Corrupt {
            path: path.clone(),
            source,
        })?;
        self.remove_temporary()?;
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(self.io("write state"))?;
        f.write_all(&bytes).map_err(self.io("write state"))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(self.io("replace state"))
    }

    /// Removes the temporary state file, if there is one; true if there was.
    fn remove_temporary(&self) -> Result<bool, IpamError> {
        match std::fs::remove_file(self.dir.join(STATE_TEMP_FILE)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.io("remove stale temporary state")(e)),
        }
    }
}

/// The state, held under the store's lock.
pub struct IpamLock<'a> {
    store: &'a IpamStore,
    _flock: Flock<File>,
    saved: IpamState,
    pub state: IpamState,
}

impl IpamLock<'_> {
    /// Writes the state back if it changed; the lock stays held.
    pub fn save(&mut self) -> Result<(), IpamError> {
        if self.state != self.saved {
            self.store.write(&self.state)?;
            self.saved = self.state.clone();
        }
        Ok(())
    }

    /// Removes the temporary copy of the state that a call killed mid-write left behind; true if
    /// there was one.
    pub fn sweep_temporary(&self) -> Result<bool, IpamError> {
        self.store.remove_temporary()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policy::hostport::{HpProtocol, PortMapping};

    #[test]
    fn hostports_persist_with_the_addresses_and_an_old_state_file_has_none() {
        let old = br#"{"last":"10.244.1.2","allocations":{"10.244.1.2":{"containerID":"a","ifname":"eth0"}}}"#;
        let st: IpamState = serde_json::from_slice(old).unwrap();
        assert!(st.hostports.is_empty());
        assert_eq!(st.allocations.len(), 1);
        assert!(!String::from_utf8(serde_json::to_vec(&st).unwrap())
            .unwrap()
            .contains("hostports"));
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::new(dir.path());
        let entry = HostportEntry {
            container_id: "a".into(),
            ifname: "eth0".into(),
            pod_ip: Ipv4Addr::new(10, 244, 1, 2),
            mappings: vec![
                PortMapping::new(HpProtocol::Tcp, 8080, 80, None),
                PortMapping::new(
                    HpProtocol::Udp,
                    5353,
                    53,
                    Some(Ipv4Addr::new(198, 51, 100, 1)),
                ),
            ],
        };
        store.update(|s| s.hostports.push(entry.clone())).unwrap();
        assert_eq!(store.read().unwrap().hostports, [entry]);
        let text = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
        assert!(text.contains(r#""hostIP": "198.51.100.1""#), "{text}");
        assert!(text.contains(r#""protocol": "udp""#), "{text}");
    }

    fn owner(c: &str) -> Owner {
        Owner {
            container_id: c.into(),
            ifname: "eth0".into(),
            pod: None,
        }
    }

    #[test]
    fn skips_network_and_broadcast() {
        let s: Ipv4Net = "10.0.0.0/30".parse().unwrap();
        assert_eq!(
            usable(s).collect::<Vec<_>>(),
            vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)]
        );
        assert_eq!(usable("10.0.0.0/24".parse().unwrap()).count(), 254);
    }

    #[test]
    fn allocation_is_idempotent_and_round_robin() {
        let subnet: Ipv4Net = "10.0.0.0/29".parse().unwrap();
        let mut st = IpamState::default();
        let (a, new) = st.allocate(subnet, owner("a")).unwrap();
        assert!(new);
        assert_eq!(a, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(st.allocate(subnet, owner("a")).unwrap(), (a, false));
        let (b, _) = st.allocate(subnet, owner("b")).unwrap();
        assert_eq!(b, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(st.release(&owner("a")), Some(a));
        assert_eq!(st.release(&owner("a")), None);
        // .1 is free again but the search goes on after the last one handed out.
        let (c, _) = st.allocate(subnet, owner("c")).unwrap();
        assert_eq!(c, Ipv4Addr::new(10, 0, 0, 3));
        // Same container, another interface: another address.
        let (d, _) = st
            .allocate(
                subnet,
                Owner {
                    ifname: "net1".into(),
                    ..owner("c")
                },
            )
            .unwrap();
        assert_ne!(c, d);
    }

    #[test]
    fn exhaustion_wraps_then_fails() {
        let subnet: Ipv4Net = "10.0.0.0/29".parse().unwrap();
        let mut st = IpamState::default();
        for i in 0..6 {
            st.allocate(subnet, owner(&format!("c{i}"))).unwrap();
        }
        let err = st.allocate(subnet, owner("c6")).unwrap_err();
        assert!(
            matches!(err, IpamError::Exhausted { capacity: 6, .. }),
            "{err}"
        );
        st.release(&owner("c2"));
        assert_eq!(
            st.allocate(subnet, owner("c6")).unwrap().0,
            Ipv4Addr::new(10, 0, 0, 3)
        );
    }

    #[test]
    fn a_new_subnet_moves_the_attachment() {
        let mut st = IpamState::default();
        let (a, _) = st
            .allocate("10.0.0.0/29".parse().unwrap(), owner("a"))
            .unwrap();
        let (b, new) = st
            .allocate("10.0.1.0/29".parse().unwrap(), owner("a"))
            .unwrap();
        assert!(new);
        assert_ne!(a, b);
        assert_eq!(st.allocations.len(), 1);
    }

    #[test]
    fn store_persists_and_reports_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::new(dir.path().join("ipam"));
        let subnet: Ipv4Net = "10.0.0.0/24".parse().unwrap();
        let (a, _) = store
            .update(|s| s.allocate(subnet, owner("a")))
            .unwrap()
            .unwrap();
        assert_eq!(store.read().unwrap().lookup(&owner("a")), Some(a));
        std::fs::write(dir.path().join("ipam").join(STATE_FILE), b"{not json").unwrap();
        let err = store.read().unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    #[test]
    fn the_search_starts_after_the_cursor_and_wraps() {
        let subnet: Ipv4Net = "10.0.0.0/8".parse().unwrap();
        assert_eq!(capacity(subnet), (1 << 24) - 2);
        assert_eq!(capacity("10.0.0.0/30".parse().unwrap()), 2);
        assert_eq!(capacity("10.0.0.0/31".parse().unwrap()), 0);
        let mut st = IpamState {
            last: Some(Ipv4Addr::new(10, 255, 255, 253)),
            ..Default::default()
        };
        let (a, _) = st.allocate(subnet, owner("a")).unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 255, 255, 254), "the last host address");
        let (b, _) = st.allocate(subnet, owner("b")).unwrap();
        assert_eq!(
            b,
            Ipv4Addr::new(10, 0, 0, 1),
            "wrapped past the broadcast address"
        );
        // A run of taken addresses after the cursor is skipped.
        for c in ["c", "d", "e"] {
            st.allocate(subnet, owner(c)).unwrap();
        }
        st.release(&owner("d"));
        st.last = Some(Ipv4Addr::new(10, 0, 0, 1));
        let (f, _) = st.allocate(subnet, owner("f")).unwrap();
        assert_eq!(f, Ipv4Addr::new(10, 0, 0, 3), "the hole d left");
        // A cursor outside the subnet (it changed) starts the search at its beginning.
        st.last = Some(Ipv4Addr::new(192, 168, 0, 1));
        let (g, _) = st.allocate(subnet, owner("g")).unwrap();
        assert_eq!(g, Ipv4Addr::new(10, 0, 0, 5));
    }

    /// Runs `f` on another thread; fails the test if it has not returned within 10 s.
    fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the call blocked")
    }

    fn mkfifo(path: &Path) {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    }

    #[test]
    fn a_held_lock_is_waited_for_a_bounded_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::new(dir.path()).with_lock_wait(Duration::from_millis(200));
        let held = store.lock().unwrap();
        let d = dir.path().to_path_buf();
        let err = within_10s(move || {
            IpamStore::new(d)
                .with_lock_wait(Duration::from_millis(200))
                .read()
                .map(|_| ())
        })
        .unwrap_err();
        assert!(matches!(err, IpamError::LockTimeout { .. }), "{err}");
        assert!(err.to_string().contains("try again later"), "{err}");
        drop(held);
        assert!(store.read().is_ok());
    }

    #[test]
    fn files_that_are_not_regular_are_errors_not_hangs() {
        let dir = tempfile::tempdir().unwrap();
        let subnet: Ipv4Net = "10.0.0.0/24".parse().unwrap();
        mkfifo(&dir.path().join(STATE_FILE));
        let d = dir.path().to_path_buf();
        let err = within_10s(move || IpamStore::new(d).read().map(|_| ())).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        assert!(err.to_string().contains(STATE_FILE), "{err}");
        std::fs::remove_file(dir.path().join(STATE_FILE)).unwrap();
        // A FIFO at the temporary name is replaced, not written through.
        mkfifo(&dir.path().join(STATE_TEMP_FILE));
        let d = dir.path().to_path_buf();
        within_10s(move || IpamStore::new(d).update(|s| s.allocate(subnet, owner("a"))))
            .unwrap()
            .unwrap();
        assert!(!dir.path().join(STATE_TEMP_FILE).exists());
        // The lock file as a FIFO.
        std::fs::remove_file(dir.path().join(LOCK_FILE)).unwrap();
        mkfifo(&dir.path().join(LOCK_FILE));
        let d = dir.path().to_path_buf();
        let err = within_10s(move || IpamStore::new(d).read().map(|_| ())).unwrap_err();
        assert!(matches!(err, IpamError::File { .. }), "{err}");
    }

    #[test]
    fn concurrent_updates_never_share_an_address() {
        let dir = tempfile::tempdir().unwrap();
        let subnet: Ipv4Net = "10.0.0.0/24".parse().unwrap();
        let handles: Vec<_> = (0..32)
            .map(|i| {
                let d = dir.path().to_path_buf();
                std::thread::spawn(move || {
                    IpamStore::new(d)
                        .update(|s| s.allocate(subnet, owner(&format!("c{i}"))))
                        .unwrap()
                        .unwrap()
                        .0
                })
            })
            .collect();
        let mut ips: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 32);
        assert_eq!(
            IpamStore::new(dir.path()).read().unwrap().allocations.len(),
            32
        );
    }
}
