//! sluice's networking: the CNI plugin's logic, IPAM out of the node's subnet, and the kernel
//! applier that wires routed veth pods over netlink.
//!
//! Deciding is kept apart from doing: [`cni`] parses and shapes protocol data, [`podnet`] turns a
//! request into a plain [`podnet::PodPlan`], [`ipam`] picks addresses, [`bandwidth`] plans a pod's
//! traffic shaping and [`tc`] builds its messages; only [`kernel`], [`shaping`] and [`netns`] touch
//! the kernel. The node agent's half: [`lease`] decides subnets from plain lease
//! data (the API behind a [`lease::store::LeaseStore`]), [`vxlan`] plans, diffs and applies the
//! overlay, [`masq`] the NAT table, [`ethtool`] switches offloads over generic netlink, [`wireguard`]
//! plans and runs the encrypted tunnel.

pub mod bandwidth;
pub mod cidr;
pub mod cni;
pub mod datapath;
pub mod ethtool;
pub mod file;
pub mod genl;
pub mod ipam;
pub mod kernel;
pub mod lease;
pub mod masq;
pub mod netns;
pub mod pod_repair;
pub mod podnet;
pub mod shaping;
pub mod subnet_env;
pub mod tc;
pub mod vxlan;
pub mod wireguard;

/// Route protocol number sluice stamps on every route it installs (`ip route ... proto 77`), so
/// that what sluice owns is recognisable and can be swept without touching anybody else's routes.
pub const ROUTE_PROTOCOL: u8 = 77;

/// Prefix of every link sluice creates.
pub const LINK_PREFIX: &str = "sl";
