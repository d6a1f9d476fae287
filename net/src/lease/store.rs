//! Where leases live: the [`LeaseStore`] capability (the agent implements it over kube's
//! `Api<Lease>`), an in-memory [`FakeLeases`] with the API server's conflict semantics, and the
//! loops that use [`super::choose_subnet`] against a store.

use super::{choose_subnet, Decision, FamilyNet, LeaseView, NodeOwner, NodeRecord, SubnetPool};
use ipnet::{IpNet, Ipv4Net};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

/// Why a store operation failed. `AlreadyExists` and `Conflict` are the two answers the
/// acquire loop retries on; everything else is the backend's.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("lease {name} already exists")]
    AlreadyExists { name: String },
    #[error("lease {name} changed since it was read (resourceVersion conflict)")]
    Conflict { name: String },
    #[error("lease {name} does not exist")]
    NotFound { name: String },
    #[error("{op} lease {name}: {source}")]
    Backend {
        op: &'static str,
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Lease CRUD with the API server's semantics. Only sluice's leases (`sluice-*`) matter; a
/// store may return others, which are ignored.
pub trait LeaseStore {
    fn list(&self) -> impl Future<Output = Result<Vec<LeaseView>, StoreError>> + Send;
    /// Creates `lease` (its resource version is ignored); [`StoreError::AlreadyExists`] if the
    /// name is taken. Returns the stored lease with its resource version.
    fn create(
        &self,
        lease: &LeaseView,
    ) -> impl Future<Output = Result<LeaseView, StoreError>> + Send;
    /// Replaces `lease` if its `resource_version` is still current ([`StoreError::Conflict`]
    /// if not; no precondition when it is `None`).
    fn update(
        &self,
        lease: &LeaseView,
    ) -> impl Future<Output = Result<LeaseView, StoreError>> + Send;
    /// Deletes `name`, if `resource_version` (when given) is still current.
    fn delete(
        &self,
        name: &str,
        resource_version: Option<&str>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// In-memory [`LeaseStore`]: a map and a resource-version counter behind a lock, shared by
/// clones. Each operation yields to the scheduler first so that concurrent callers interleave.
#[derive(Debug, Clone, Default)]
pub struct FakeLeases {
    state: Arc<Mutex<FakeState>>,
}

#[derive(Debug, Default)]
struct FakeState {
    leases: BTreeMap<String, LeaseView>,
    version: u64,
}

impl FakeState {
    fn stamp(&mut self, lease: &LeaseView) -> LeaseView {
        self.version += 1;
        let mut stored = lease.clone();
        stored.resource_version = Some(self.version.to_string());
        self.leases.insert(stored.name.clone(), stored.clone());
        stored
    }
}

impl FakeLeases {
    fn with<R>(&self, f: impl FnOnce(&mut FakeState) -> R) -> R {
        let mut guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut guard)
    }

    /// A snapshot of every lease, by name.
    pub fn snapshot(&self) -> BTreeMap<String, LeaseView> {
        self.with(|s| s.leases.clone())
    }

    /// Puts `lease` in place as is (test setup), giving it a resource version.
    pub fn insert(&self, lease: LeaseView) -> LeaseView {
        self.with(|s| s.stamp(&lease))
    }
}

impl LeaseStore for FakeLeases {
    async fn list(&self) -> Result<Vec<LeaseView>, StoreError> {
        tokio::task::yield_now().await;
        Ok(self.with(|s| s.leases.values().cloned().collect()))
    }

    async fn create(&self, lease: &LeaseView) -> Result<LeaseView, StoreError> {
        tokio::task::yield_now().await;
        self.with(|s| {
            if s.leases.contains_key(&lease.name) {
                return Err(StoreError::AlreadyExists {
                    name: lease.name.clone(),
                });
            }
            Ok(s.stamp(lease))
        })
    }

    async fn update(&self, lease: &LeaseView) -> Result<LeaseView, StoreError> {
        tokio::task::yield_now().await;
        self.with(|s| {
            let Some(current) = s.leases.get(&lease.name) else {
                return Err(StoreError::NotFound {
                    name: lease.name.clone(),
                });
            };
            if lease.resource_version.is_some()
                && lease.resource_version != current.resource_version
            {
                return Err(StoreError::Conflict {
                    name: lease.name.clone(),
                });
            }
            Ok(s.stamp(lease))
        })
    }

    async fn delete(&self, name: &str, resource_version: Option<&str>) -> Result<(), StoreError> {
        tokio::task::yield_now().await;
        self.with(|s| {
            let Some(current) = s.leases.get(name) else {
                return Err(StoreError::NotFound { name: name.into() });
            };
            if resource_version.is_some() && resource_version != current.resource_version.as_deref()
            {
                return Err(StoreError::Conflict { name: name.into() });
            }
            s.leases.remove(name);
            Ok(())
        })
    }
}

/// What [`acquire`] needs to know about the node.
#[derive(Debug, Clone)]
pub struct AcquireRequest<N: FamilyNet = Ipv4Net> {
    pub pool: SubnetPool<N>,
    /// The node's record; its subnet of the pool's family is overwritten with the one acquired.
    pub record: NodeRecord,
    pub owner: Option<NodeOwner>,
    pub duration_secs: u32,
    /// A subnet to ask for first (e.g. the one in the last `subnet.env`).
    pub prefer: Option<N>,
    /// Attempts before giving up when every attempt loses a race.
    pub max_attempts: u32,
}

/// How the subnet was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcquiredBy {
    Kept,
    Reclaimed,
    Created,
}

#[derive(Debug, Clone)]
pub struct Acquired<N: FamilyNet = Ipv4Net> {
    pub subnet: N,
    /// The lease as stored (with the resource version for the next renewal).
    pub lease: LeaseView,
    pub by: AcquiredBy,
    /// The node's record as published (with the family's subnet set).
    pub record: NodeRecord,
}

#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error("no free subnet of /{subnet_len} left in {cluster_cidr}")]
    Exhausted { cluster_cidr: IpNet, subnet_len: u8 },
    #[error("lost the race for a subnet {attempts} times in a row")]
    TooManyConflicts { attempts: u32 },
    #[error("subnet {subnet} is held by node {holder}, whose lease is still valid")]
    HeldByOther { subnet: IpNet, holder: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Takes a subnet for `req.record.node`: lists the leases, decides with [`choose_subnet`], and
/// performs the decision; losing a race (`AlreadyExists`, `Conflict`, `NotFound`) re-lists and
/// decides again, up to `req.max_attempts` times. `now` is read at every attempt.
pub async fn acquire<S: LeaseStore, N: FamilyNet>(
    store: &S,
    req: &AcquireRequest<N>,
    now: impl Fn() -> SystemTime,
) -> Result<Acquired<N>, AcquireError> {
    let node = req.record.node.as_str();
    // Names a create found taken though the list did not show them (an object the store does
    // not list, such as a Lease without sluice's label): their subnets count as held, or every
    // attempt would pick the same one again.
    let mut unseen: Vec<LeaseView> = Vec::new();
    for attempt in 1..=req.max_attempts.max(1) {
        let mut leases = store.list().await?;
        leases.extend(
            unseen
                .iter()
                .filter(|u| !leases.iter().any(|l| l.name == u.name))
                .cloned()
                .collect::<Vec<_>>(),
        );
        let t = now();
        let decision = choose_subnet(&req.pool, node, &leases, t, req.prefer);
        tracing::debug!(node, attempt, ?decision, "subnet decision");
        let current = |name: &str| leases.iter().find(|l| l.name == name);
        let mut record = req.record.clone();
        let outcome = match &decision {
            Decision::Exhausted => {
                return Err(AcquireError::Exhausted {
                    cluster_cidr: req.pool.cluster_cidr().into(),
                    subnet_len: req.pool.subnet_len(),
                })
            }
            Decision::CreateNew { subnet } => {
                subnet.set_in(&mut record);
                let lease = LeaseView::new_held_of(
                    *subnet,
                    &record,
                    req.owner.clone(),
                    req.duration_secs,
                    t,
                );
                store.create(&lease).await.map(|l| (l, AcquiredBy::Created))
            }
            Decision::Keep { name, subnet, .. } | Decision::TakeExpired { name, subnet, .. } => {
                subnet.set_in(&mut record);
                let Some(old) = current(name) else {
                    continue;
                };
                if matches!(decision, Decision::Keep { .. }) {
                    let mut next = old.renewed(&record, t);
                    if next.owner.is_none() {
                        next.owner = req.owner.clone();
                    }
                    next.duration_secs = Some(req.duration_secs);
                    store.update(&next).await.map(|l| (l, AcquiredBy::Kept))
                } else {
                    let next = old.taken_by(&record, req.owner.clone(), req.duration_secs, t);
                    store
                        .update(&next)
                        .await
                        .map(|l| (l, AcquiredBy::Reclaimed))
                }
            }
        };
        match outcome {
            Ok((lease, by)) => {
                let subnet = N::in_record(&record).unwrap_or(req.pool.cluster_cidr());
                tracing::info!(node, %subnet, ?by, attempt, "subnet lease held");
                return Ok(Acquired {
                    subnet,
                    lease,
                    by,
                    record,
                });
            }
            Err(StoreError::AlreadyExists { name }) => {
                if let Decision::CreateNew { subnet } = decision {
                    if !leases.iter().any(|l| l.name == name) {
                        tracing::warn!(node, lease = name, "a lease of that name exists but is not one of sluice's: its subnet is skipped");
                        let mut blocker =
                            LeaseView::new_held_of(subnet, &req.record, None, u32::MAX, t);
                        blocker.holder = Some(String::from("(not sluice's)"));
                        unseen.push(blocker);
                    }
                }
                tracing::debug!(
                    node,
                    attempt,
                    lease = name,
                    "lost a race for a subnet; retrying"
                );
            }
            Err(e @ (StoreError::Conflict { .. } | StoreError::NotFound { .. })) => {
                tracing::debug!(node, attempt, error = %e, "lost a race for a subnet; retrying");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(AcquireError::TooManyConflicts {
        attempts: req.max_attempts.max(1),
    })
}

/// Renews a held lease (and republishes `record`). A `Conflict` or `NotFound` means the lease
/// changed under the node: the agent must [`acquire`] again (which keeps it if it is still its).
pub async fn renew<S: LeaseStore>(
    store: &S,
    held: &LeaseView,
    record: &NodeRecord,
    now: SystemTime,
) -> Result<LeaseView, StoreError> {
    store.update(&held.renewed(record, now)).await
}

/// `node-podcidr` mode: writes `lease` (from [`super::podcidr_lease`]), since the subnet was
/// assigned by the cluster and not raced for: create, or update the current one. Never over a
/// valid lease of another node ([`AcquireError::HeldByOther`]): on a cluster that leased its
/// subnets before, the podCIDR the controller-manager gave this node may be another node's
/// subnet, and two nodes must never route the same one.
pub async fn publish<S: LeaseStore>(
    store: &S,
    lease: &LeaseView,
    now: SystemTime,
    max_attempts: u32,
) -> Result<LeaseView, AcquireError> {
    for _ in 0..max_attempts.max(1) {
        match store.create(lease).await {
            Ok(stored) => return Ok(stored),
            Err(StoreError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let Some(current) = store
            .list()
            .await?
            .into_iter()
            .find(|l| l.name == lease.name)
        else {
            continue;
        };
        if current.holder != lease.holder && !super::is_expired(&current, now) {
            let subnet = super::parse_lease_name(&lease.name)
                .map(IpNet::from)
                .or_else(|_| super::parse_lease_name_v6(&lease.name).map(IpNet::from))
                .unwrap_or_default();
            return Err(AcquireError::HeldByOther {
                subnet,
                holder: current.holder.unwrap_or_default(),
            });
        }
        let mut next = lease.clone();
        next.resource_version = current.resource_version;
        if current.holder == lease.holder {
            next.acquire_time = current.acquire_time.or(next.acquire_time);
        }
        match store.update(&next).await {
            Ok(stored) => return Ok(stored),
            Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Err(AcquireError::TooManyConflicts {
        attempts: max_attempts.max(1),
    })
}
