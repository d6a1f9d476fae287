//! The resource kinds this server knows, and how they behave.

/// One served resource (a collection of one kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resource {
    /// Plural name, as in the URL (`pods`).
    pub name: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    /// API group; empty for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Whether the kind has a `status` subresource (writes to the main resource ignore `.status`).
    pub status_subresource: bool,
    /// Whether `metadata.generation` is maintained.
    pub generation: bool,
    /// Whether PUT on a missing object creates it.
    pub create_on_update: bool,
}

impl Resource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods` or `networkpolicies.networking.k8s.io`, as kube-apiserver names it in messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.name.to_string()
        } else {
            format!("{}.{}", self.name, self.group)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }
}

pub(crate) const NAMESPACES: Resource = Resource {
    name: "namespaces",
    singular: "namespace",
    kind: "Namespace",
    group: "",
    version: "v1",
    namespaced: false,
    short_names: &["ns"],
    status_subresource: true,
    generation: false,
    create_on_update: false,
};

pub(crate) const NODES: Resource = Resource {
    name: "nodes",
    singular: "node",
    kind: "Node",
    group: "",
    version: "v1",
    namespaced: false,
    short_names: &["no"],
    status_subresource: true,
    generation: false,
    create_on_update: false,
};

pub(crate) const PODS: Resource = Resource {
    name: "pods",
    singular: "pod",
    kind: "Pod",
    group: "",
    version: "v1",
    namespaced: true,
    short_names: &["po"],
    status_subresource: true,
    generation: true,
    create_on_update: false,
};

pub(crate) const CONFIGMAPS: Resource = Resource {
    name: "configmaps",
    singular: "configmap",
    kind: "ConfigMap",
    group: "",
    version: "v1",
    namespaced: true,
    short_names: &["cm"],
    status_subresource: false,
    generation: false,
    create_on_update: false,
};

pub(crate) const NETWORK_POLICIES: Resource = Resource {
    name: "networkpolicies",
    singular: "networkpolicy",
    kind: "NetworkPolicy",
    group: "networking.k8s.io",
    version: "v1",
    namespaced: true,
    short_names: &["netpol"],
    status_subresource: false,
    generation: true,
    create_on_update: false,
};

/// network-policy-api's ClusterNetworkPolicy (a CRD on a real cluster), cluster-scoped.
pub(crate) const CLUSTER_NETWORK_POLICIES: Resource = Resource {
    name: "clusternetworkpolicies",
    singular: "clusternetworkpolicy",
    kind: "ClusterNetworkPolicy",
    group: "policy.networking.k8s.io",
    version: "v1alpha2",
    namespaced: false,
    short_names: &["cnp"],
    status_subresource: false,
    generation: true,
    create_on_update: false,
};

pub(crate) const LEASES: Resource = Resource {
    name: "leases",
    singular: "lease",
    kind: "Lease",
    group: "coordination.k8s.io",
    version: "v1",
    namespaced: true,
    short_names: &[],
    status_subresource: false,
    generation: false,
    create_on_update: true,
};

/// Core v1 events: kube-apiserver serves them with every cluster, and clients expect them
/// (`kubectl describe` lists a ConfigMap's events, and fails if it cannot).
pub(crate) const EVENTS: Resource = Resource {
    name: "events",
    singular: "event",
    kind: "Event",
    group: "",
    version: "v1",
    namespaced: true,
    short_names: &["ev"],
    status_subresource: false,
    generation: false,
    create_on_update: false,
};

/// Every served kind. A kind added here also gets its typed form in `decode::codec` (a serde
/// type, k8s-openapi's or its own), which checks its fields' types and drops unknown fields; a
/// unit test there holds every kind of this list to it.
pub(crate) const ALL: [Resource; 8] = [
    NAMESPACES,
    NODES,
    PODS,
    CONFIGMAPS,
    NETWORK_POLICIES,
    CLUSTER_NETWORK_POLICIES,
    LEASES,
    EVENTS,
];

/// The groups served under `/apis`, in discovery order.
pub(crate) const GROUPS: [&str; 3] = [
    "networking.k8s.io",
    "coordination.k8s.io",
    "policy.networking.k8s.io",
];

/// The one version served of `group` (`v1`, but `v1alpha2` for network-policy-api's group).
pub(crate) fn group_version(group: &str) -> &'static str {
    ALL.iter()
        .find(|r| r.group == group)
        .map(|r| r.version)
        .unwrap_or("v1")
}

/// The resource served at `group`/`version` with plural `name`.
pub(crate) fn lookup(group: &str, version: &str, name: &str) -> Option<Resource> {
    ALL.iter()
        .find(|r| r.group == group && r.version == version && r.name == name)
        .copied()
}

/// Looks a resource up by its plural name alone (names are unique here).
pub(crate) fn by_name(name: &str) -> Option<Resource> {
    ALL.iter().find(|r| r.name == name).copied()
}

pub(crate) fn in_group_version(group: &str, version: &str) -> Vec<Resource> {
    ALL.iter()
        .filter(|r| r.group == group && r.version == version)
        .copied()
        .collect()
}
