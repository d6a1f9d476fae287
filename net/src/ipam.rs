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
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sluice_policy::hostport::HostportEntry;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
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
    /// [`IpamState::last`] for the IPv6 family.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_v6: Option<Ipv6Addr>,
    /// The IPv6 addresses, keyed and owned as [`IpamState::allocations`]. Absent from a state
    /// file from before IPv6 (and from an IPv4-only node's), which reads as none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub allocations_v6: BTreeMap<Ipv6Addr, Owner>,
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// One family's subnet is full (the subnet says which family).
    #[error("no free address in {subnet}: all {capacity} addresses are allocated")]
    Exhausted { subnet: IpNet, capacity: u128 },
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
        held_by(&self.allocations, owner)
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
            subnet: subnet.into(),
            capacity: capacity(subnet).into(),
        })?;
        self.allocations.insert(ip, owner);
        self.last = Some(ip);
        Ok((ip, true))
    }

    /// Frees what `owner`'s attachment holds; returns the address it had.
    pub fn release(&mut self, owner: &Owner) -> Option<Ipv4Addr> {
        release_held(&mut self.allocations, owner)
    }
}

/// The address of either family `owner`'s attachment holds in `allocations`, if any.
fn held_by<A: Copy>(allocations: &BTreeMap<A, Owner>, owner: &Owner) -> Option<A> {
    allocations
        .iter()
        .find(|(_, o)| o.same_attachment(owner))
        .map(|(ip, _)| *ip)
}

/// Frees the address `owner`'s attachment holds in `allocations`; returns it.
fn release_held<A: Copy + Ord>(allocations: &mut BTreeMap<A, Owner>, owner: &Owner) -> Option<A> {
    let ip = held_by(allocations, owner)?;
    allocations.remove(&ip);
    Some(ip)
}

/// The first and last address pods may get in an IPv6 `subnet`, if it has any: all but the
/// network address (the subnet-router anycast address, RFC 4291), which is left for the node's
/// own tunnel device as IPv4's is. IPv6 has no broadcast address.
fn host_range_v6(subnet: Ipv6Net) -> Option<(u128, u128)> {
    let first = u128::from(subnet.network()).checked_add(1)?;
    let last = u128::from(subnet.broadcast());
    (first <= last).then_some((first, last))
}

/// How many addresses pods may get in an IPv6 `subnet`.
pub fn capacity_v6(subnet: Ipv6Net) -> u128 {
    host_range_v6(subnet).map_or(0, |(first, last)| last - first + 1)
}

/// [`choose`] for IPv6: the first free usable address after [`IpamState::last_v6`], wrapping
/// around the subnet, looking at most at one more address than are allocated (a /64 has 2^64).
pub fn choose_v6(subnet: Ipv6Net, state: &IpamState) -> Option<Ipv6Addr> {
    let (first, last) = host_range_v6(subnet)?;
    let span = last - first + 1;
    let start = state
        .last_v6
        .map(u128::from)
        .filter(|l| (first..last).contains(l))
        .map_or(first, |l| l + 1);
    let offset = start - first;
    let taken = state
        .allocations_v6
        .range(Ipv6Addr::from(first)..=Ipv6Addr::from(last))
        .count() as u128;
    (0..=taken.min(span - 1))
        // offset + i, modulo span, without overflowing on the widest subnets.
        .map(|i| {
            let pos = if i < span - offset {
                offset + i
            } else {
                i - (span - offset)
            };
            Ipv6Addr::from(first + pos)
        })
        .find(|a| !state.allocations_v6.contains_key(a))
}

/// What one ADD holds, per family the node has: the address and whether it is new.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FamilyAddresses {
    pub v4: Option<(Ipv4Addr, bool)>,
    pub v6: Option<(Ipv6Addr, bool)>,
}

/// The addresses GC freed, per family.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Freed {
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

impl IpamState {
    /// The IPv6 address `owner`'s attachment holds, if any.
    pub fn lookup_v6(&self, owner: &Owner) -> Option<Ipv6Addr> {
        held_by(&self.allocations_v6, owner)
    }

    /// [`IpamState::allocate`] for IPv6: the address `owner` holds in `subnet`, else a free one;
    /// an address it held in another subnet is freed. Returns the address and whether it is new.
    pub fn allocate_v6(
        &mut self,
        subnet: Ipv6Net,
        owner: Owner,
    ) -> Result<(Ipv6Addr, bool), IpamError> {
        if let Some(ip) = self.lookup_v6(&owner).filter(|ip| subnet.contains(ip)) {
            return Ok((ip, false));
        }
        self.release_v6(&owner);
        let ip = choose_v6(subnet, self).ok_or(IpamError::Exhausted {
            subnet: subnet.into(),
            capacity: capacity_v6(subnet),
        })?;
        self.allocations_v6.insert(ip, owner);
        self.last_v6 = Some(ip);
        Ok((ip, true))
    }

    /// Frees the IPv6 address `owner`'s attachment holds; returns it.
    pub fn release_v6(&mut self, owner: &Owner) -> Option<Ipv6Addr> {
        release_held(&mut self.allocations_v6, owner)
    }

    /// An address of each family the node has a subnet of, all or nothing: when one family is
    /// exhausted the other's address made by this call is given back and the state is as it
    /// was, so a failed ADD holds nothing. Idempotent per attachment as the per-family calls.
    pub fn allocate_families(
        &mut self,
        v4: Option<Ipv4Net>,
        v6: Option<Ipv6Net>,
        owner: Owner,
    ) -> Result<FamilyAddresses, IpamError> {
        let before = (v4.is_some() && v6.is_some()).then(|| self.clone());
        let mut out = FamilyAddresses::default();
        let result = (|| {
            if let Some(subnet) = v4 {
                out.v4 = Some(self.allocate(subnet, owner.clone())?);
            }
            if let Some(subnet) = v6 {
                out.v6 = Some(self.allocate_v6(subnet, owner.clone())?);
            }
            Ok(out)
        })();
        if let (Err(_), Some(before)) = (&result, before) {
            *self = before;
        }
        result
    }

    /// Frees what `owner`'s attachment holds in both families (DEL).
    pub fn release_families(&mut self, owner: &Owner) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
        (self.release(owner), self.release_v6(owner))
    }

    /// GC: frees, in both families, every address whose attachment `valid` does not keep.
    pub fn collect_garbage(&mut self, valid: impl Fn(&Owner) -> bool) -> Freed {
        let freed = Freed {
            v4: self
                .allocations
                .iter()
                .filter(|(_, o)| !valid(o))
                .map(|(ip, _)| *ip)
                .collect(),
            v6: self
                .allocations_v6
                .iter()
                .filter(|(_, o)| !valid(o))
                .map(|(ip, _)| *ip)
                .collect(),
        };
        self.allocations.retain(|_, o| valid(o));
        self.allocations_v6.retain(|_, o| valid(o));
        freed
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
            pod_ip: Some(Ipv4Addr::new(10, 244, 1, 2)),
            pod_ip6: None,
            mappings: vec![
                PortMapping::new(HpProtocol::Tcp, 8080, 80, None),
                PortMapping::new(
                    HpProtocol::Udp,
                    5353,
                    53,
                    Some(Ipv4Addr::new(198, 51, 100, 1).into()),
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

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn a_state_file_from_before_ipv6_reads_and_writes_as_it_was() {
        let old = br#"{"last":"10.244.1.2","allocations":{"10.244.1.2":{"containerID":"a","ifname":"eth0"}}}"#;
        let st: IpamState = serde_json::from_slice(old).unwrap();
        assert!(st.allocations_v6.is_empty() && st.last_v6.is_none());
        assert_eq!(serde_json::to_vec(&st).unwrap(), old.to_vec());
        let mut dual = st.clone();
        dual.allocate_v6("fd00:10:244:1::/64".parse().unwrap(), owner("a"))
            .unwrap();
        let text = serde_json::to_string(&dual).unwrap();
        assert!(
            text.contains(r#""lastV6":"fd00:10:244:1::1","allocationsV6":{"fd00:10:244:1::1":{"containerID":"a""#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<IpamState>(&text).unwrap(), dual);
    }

    #[test]
    fn ipv6_allocation_is_idempotent_and_round_robin() {
        let subnet: Ipv6Net = "fd00:10:244:1::/64".parse().unwrap();
        let mut st = IpamState::default();
        let (a, new) = st.allocate_v6(subnet, owner("a")).unwrap();
        assert!(new);
        assert_eq!(a, v6("fd00:10:244:1::1"), "the network address is left out");
        assert_eq!(st.allocate_v6(subnet, owner("a")).unwrap(), (a, false));
        let (b, _) = st.allocate_v6(subnet, owner("b")).unwrap();
        assert_eq!(b, v6("fd00:10:244:1::2"));
        assert_eq!(st.release_v6(&owner("a")), Some(a));
        assert_eq!(st.release_v6(&owner("a")), None);
        let (c, _) = st.allocate_v6(subnet, owner("c")).unwrap();
        assert_eq!(
            c,
            v6("fd00:10:244:1::3"),
            "a freed address is not reused at once"
        );
        let (d, _) = st
            .allocate_v6(
                subnet,
                Owner {
                    ifname: "net1".into(),
                    ..owner("c")
                },
            )
            .unwrap();
        assert_ne!(c, d);
        // The families are apart: IPv6 allocations hold no IPv4 address.
        assert!(st.allocations.is_empty() && st.last.is_none());
        // A new IPv6 subnet moves the attachment.
        let (e, new) = st
            .allocate_v6("fd00:10:244:2::/64".parse().unwrap(), owner("c"))
            .unwrap();
        assert!(new && e == v6("fd00:10:244:2::1"));
        assert_eq!(st.lookup_v6(&owner("c")), Some(e));
        assert_eq!(st.allocations_v6.len(), 3);
    }

    #[test]
    fn ipv6_exhaustion_is_its_own_familys() {
        let subnet: Ipv6Net = "fd00:10:244:1::/124".parse().unwrap();
        assert_eq!(capacity_v6(subnet), 15);
        assert_eq!(capacity_v6("fd00::/128".parse().unwrap()), 0);
        assert_eq!(capacity_v6("fd00::/64".parse().unwrap()), (1 << 64) - 1);
        let mut st = IpamState::default();
        for i in 0..15 {
            let (ip, _) = st.allocate_v6(subnet, owner(&format!("c{i}"))).unwrap();
            assert!(subnet.contains(&ip) && ip != subnet.network());
        }
        let err = st.allocate_v6(subnet, owner("c15")).unwrap_err();
        assert!(
            matches!(
                err,
                IpamError::Exhausted {
                    capacity: 15,
                    subnet: IpNet::V6(_)
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("fd00:10:244:1::/124"), "{err}");
        // The IPv4 family is not full because the IPv6 one is.
        let v4: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        assert!(st.allocate(v4, owner("c15")).is_ok());
        st.release_v6(&owner("c3"));
        assert_eq!(
            st.allocate_v6(subnet, owner("c15")).unwrap().0,
            v6("fd00:10:244:1::4")
        );
    }

    #[test]
    fn the_ipv6_search_wraps_without_overflow_on_wide_subnets() {
        let subnet: Ipv6Net = "fd00::/16".parse().unwrap();
        let mut st = IpamState {
            last_v6: Some(v6("fd00:ffff:ffff:ffff:ffff:ffff:ffff:fffe")),
            ..Default::default()
        };
        let (a, _) = st.allocate_v6(subnet, owner("a")).unwrap();
        assert_eq!(
            a,
            v6("fd00:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
            "IPv6 has no broadcast"
        );
        let (b, _) = st.allocate_v6(subnet, owner("b")).unwrap();
        assert_eq!(b, v6("fd00::1"), "wrapped past the end");
        // A cursor outside the subnet starts the search at its beginning.
        st.last_v6 = Some(v6("2001:db8::1"));
        let (c, _) = st.allocate_v6(subnet, owner("c")).unwrap();
        assert_eq!(c, v6("fd00::2"));
    }

    #[test]
    fn both_families_or_neither() {
        let v4: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        let full: Ipv6Net = "fd00:10:244:1::/126".parse().unwrap();
        let mut st = IpamState::default();
        let got = st
            .allocate_families(Some(v4), Some(full), owner("a"))
            .unwrap();
        assert_eq!(
            got,
            FamilyAddresses {
                v4: Some((Ipv4Addr::new(10, 244, 1, 1), true)),
                v6: Some((v6("fd00:10:244:1::1"), true)),
            }
        );
        // Again: the same addresses, nothing new.
        let again = st
            .allocate_families(Some(v4), Some(full), owner("a"))
            .unwrap();
        assert_eq!(again.v4, Some((Ipv4Addr::new(10, 244, 1, 1), false)));
        assert_eq!(again.v6, Some((v6("fd00:10:244:1::1"), false)));
        for c in ["b", "c"] {
            st.allocate_families(Some(v4), Some(full), owner(c))
                .unwrap();
        }
        // The IPv6 subnet is full: d gets no IPv4 address either, and the state is unchanged.
        let before = st.clone();
        let err = st
            .allocate_families(Some(v4), Some(full), owner("d"))
            .unwrap_err();
        assert!(
            matches!(
                err,
                IpamError::Exhausted {
                    subnet: IpNet::V6(_),
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(st, before);
        // One family only, either one.
        let only4 = st.allocate_families(Some(v4), None, owner("d")).unwrap();
        assert!(only4.v4.is_some() && only4.v6.is_none());
        let mut st6 = IpamState::default();
        let only6 = st6.allocate_families(None, Some(full), owner("d")).unwrap();
        assert!(only6.v4.is_none() && only6.v6.is_some());
        assert!(st6.allocations.is_empty());
        // DEL frees both; GC frees both families of what is not valid.
        assert_eq!(
            st.release_families(&owner("a")),
            (
                Some(Ipv4Addr::new(10, 244, 1, 1)),
                Some(v6("fd00:10:244:1::1"))
            )
        );
        assert_eq!(st.release_families(&owner("a")), (None, None));
        let freed = st.collect_garbage(|o| o.container_id == "b");
        assert_eq!(
            freed.v4,
            [Ipv4Addr::new(10, 244, 1, 3), Ipv4Addr::new(10, 244, 1, 4)]
        );
        assert_eq!(freed.v6, [v6("fd00:10:244:1::3")]);
        assert_eq!(st.allocations.len(), 1);
        assert_eq!(st.allocations_v6.len(), 1);
        assert_eq!(st.lookup_v6(&owner("b")), Some(v6("fd00:10:244:1::2")));
    }

    #[test]
    fn concurrent_dual_allocations_never_share_an_address() {
        let dir = tempfile::tempdir().unwrap();
        let v4: Ipv4Net = "10.0.0.0/24".parse().unwrap();
        let v6net: Ipv6Net = "fd00:10::/64".parse().unwrap();
        let handles: Vec<_> = (0..24)
            .map(|i| {
                let d = dir.path().to_path_buf();
                std::thread::spawn(move || {
                    IpamStore::new(d)
                        .update(|s| {
                            s.allocate_families(Some(v4), Some(v6net), owner(&format!("c{i}")))
                        })
                        .unwrap()
                        .unwrap()
                })
            })
            .collect();
        let got: Vec<FamilyAddresses> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let mut a4: Vec<_> = got.iter().map(|g| g.v4.unwrap().0).collect();
        let mut a6: Vec<_> = got.iter().map(|g| g.v6.unwrap().0).collect();
        a4.sort();
        a4.dedup();
        a6.sort();
        a6.dedup();
        assert_eq!((a4.len(), a6.len()), (24, 24));
        let st = IpamStore::new(dir.path()).read().unwrap();
        assert_eq!((st.allocations.len(), st.allocations_v6.len()), (24, 24));
    }
}
