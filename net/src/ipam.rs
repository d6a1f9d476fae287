//! Address allocation out of the node's subnet.
//!
//! State is one JSON file in the IPAM directory, read and rewritten (temp file, rename) under an
//! exclusive `flock`, so concurrent plugin calls serialise on it and a crash never leaves a torn
//! file. Allocations are keyed by (container id, interface name): a repeated ADD gets the same
//! address back and a repeated DEL is a no-op.

use ipnet::Ipv4Net;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

const STATE_FILE: &str = "allocations.json";
const LOCK_FILE: &str = "lock";

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
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("no free address in {subnet}: all {capacity} addresses are allocated")]
    Exhausted { subnet: Ipv4Net, capacity: u32 },
    #[error("IPAM directory {dir}: {op}: {source}")]
    Io {
        dir: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("IPAM state {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The addresses pods may get in `subnet`: all but the network and broadcast addresses. The
/// network address is left for the node's own tunnel device.
pub fn usable(subnet: Ipv4Net) -> impl Iterator<Item = Ipv4Addr> {
    let first = u32::from(subnet.network()).saturating_add(1);
    let last = u32::from(subnet.broadcast()).saturating_sub(1);
    (first..=last).map(Ipv4Addr::from)
}

/// Picks the first free usable address after `last`, wrapping around the subnet. Pure.
pub fn choose(subnet: Ipv4Net, state: &IpamState) -> Option<Ipv4Addr> {
    let start = state.last.filter(|l| subnet.contains(l)).map(u32::from);
    let (after, before): (Vec<Ipv4Addr>, Vec<Ipv4Addr>) =
        usable(subnet).partition(|a| start.is_some_and(|s| u32::from(*a) > s));
    after
        .into_iter()
        .chain(before)
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
            capacity: usable(subnet).count() as u32,
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
}

impl IpamStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
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

    /// Takes the lock and reads the state. The lock is held until the [`IpamLock`] is dropped,
    /// so a caller may act on the kernel while no other call can allocate.
    pub fn lock(&self) -> Result<IpamLock<'_>, IpamError> {
        std::fs::create_dir_all(&self.dir).map_err(self.io("create"))?;
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(LOCK_FILE))
            .map_err(self.io("open lock"))?;
        let flock = Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, errno)| {
            IpamError::Io {
                dir: self.dir.clone(),
                op: "lock",
                source: errno.into(),
            }
        })?;
        let path = self.dir.join(STATE_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) if bytes.is_empty() => IpamState::default(),
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| IpamError::Corrupt {
                path: path.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => IpamState::default(),
            Err(e) => return Err(self.io("read state")(e)),
        };
        Ok(IpamLock {
            store: self,
            _flock: flock,
            saved: state.clone(),
            state,
        })
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

    fn write(&self, state: &IpamState) -> Result<(), IpamError> {
        let path = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(format!(".{STATE_FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(state).map_err(|source| IpamError::Corrupt {
            path: path.clone(),
            source,
        })?;
        let mut f = File::create(&tmp).map_err(self.io("write state"))?;
        f.write_all(&bytes).map_err(self.io("write state"))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(self.io("replace state"))
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
