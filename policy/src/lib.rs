//! sluice's NetworkPolicy engine, shaped like felix: deciding apart from doing.
//!
//! - [`compile`] (pure) turns Pods (as [`ClusterPod`]s, what policy reads of k8s-openapi's
//!   `Pod`), Namespaces and NetworkPolicies (k8s-openapi's typed objects) and the node's local
//!   pods into one [`PolicyIr`]: per local pod and direction, whether it is isolated and which
//!   (address, protocol, port) it may talk to. The Kubernetes semantics live here and nowhere
//!   else.
//! - [`nft::render`] and [`iptables::render`] (pure) turn the IR into text for
//!   `nft -f -` (one table `inet sluice-policy`, verdict maps keyed by interface name, interval
//!   sets) and for `ipset restore` + `iptables-restore --noflush` (chains prefixed `SLUICE-`).
//! - [`Firewall`] is the applier: [`NftCli`], [`IptablesRestore`], [`FakeFirewall`]. `apply`
//!   observes the hash comment sluice left in the kernel and writes only when it differs.
//! - [`conntrack`] cuts established flows the new IR denies.

pub mod cnp;
pub mod compile;
pub mod conntrack;
pub mod droplog;
pub mod firewall;
pub mod hostport;
pub mod iptables;
pub mod ir;
pub mod memo;
pub mod nft;
pub mod selector;

pub use compile::{compile, ClusterPod, Compiler, LocalPod, NamedPort, PolicyInput};
pub use conntrack::ConntrackCli;
pub use firewall::{
    auto, Applied, Backend, Exec, FakeFirewall, Firewall, FirewallError, Observed, Rendered,
};
pub use iptables::{IptablesMode, IptablesRestore};
pub use ir::{AddrSet, Direction, PodPolicy, PolicyIr, PortEntry, Protocol, Region, TierVerdict};
pub use nft::NftCli;

/// Prefix of the host-side pod veths sluice makes (sluice-net's `LINK_PREFIX`); an interface
/// with this prefix that the IR does not know drops traffic (fail closed).
pub const LINK_PREFIX: &str = "sl";

/// A short stable hash (FNV-1a 64) of rendered text, carried as a comment in the kernel.
pub fn text_hash(text: &str) -> String {
    format!("{:016x}", fnv1a(FNV_START, text.as_bytes()))
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a 64 continued over `bytes`, so that a hash can be taken over parts without joining them.
fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The k8s-openapi the input types come from, so callers use the very same version.
pub use k8s_openapi;
