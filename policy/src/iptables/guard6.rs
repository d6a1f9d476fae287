//! The iptables backend's IPv6 guard. The policy chains are IPv4 (`iptables`, `inet` ipsets),
//! so on a node whose pods have IPv6 addresses their IPv6 traffic would pass `ip6tables`
//! untouched: a pod a NetworkPolicy selects would accept every IPv6 connection. Until the
//! renderer speaks IPv6 (issue 23's policy step), this chain fails closed instead: in
//! `ip6tables`' filter table, jumped to from `FORWARD` and `INPUT`, it drops new IPv6 flows to a
//! pod whose ingress is enforced and from a pod whose egress is, and on veths it does not know,
//! as the IPv4 chains do; replies of flows already let through, neighbour discovery, and pods
//! no policy selects pass. (The nftables backend needs no guard: its table is `inet`, its
//! dispatch is by interface, and a selected pod's chain ends in `drop`, which IPv6 reaches.)

use super::CHAIN_PREFIX;
use crate::ir::PolicyIr;
use std::fmt::Write as _;

/// The guard chain's name.
pub fn chain() -> String {
    format!("{CHAIN_PREFIX}V6-GUARD")
}

/// `ip6tables-restore --noflush` input that makes the guard chain what `ir` wants (declared, so
/// flushed and refilled in one transaction). Pure.
pub fn render(ir: &PolicyIr) -> String {
    let c = chain();
    let mut s = format!("*filter\n:{c} - [0:0]\n");
    let _ = writeln!(
        s,
        "-A {c} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
    );
    for t in [135, 136] {
        let _ = writeln!(
            s,
            "-A {c} -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j RETURN"
        );
    }
    for pod in &ir.pods {
        let verdict = |enforced: bool| if enforced { "DROP" } else { "RETURN" };
        let _ = writeln!(
            s,
            "-A {c} -o {} -j {}",
            pod.ifname,
            verdict(pod.ingress.enforced())
        );
        let _ = writeln!(
            s,
            "-A {c} -i {} -j {}",
            pod.ifname,
            verdict(pod.egress.enforced())
        );
    }
    for flag in ["-o", "-i"] {
        let _ = writeln!(s, "-A {c} {flag} sluice+ -j RETURN");
        let _ = writeln!(s, "-A {c} {flag} sl+ -j DROP");
    }
    s.push_str("COMMIT\n");
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ir::{Direction, PodPolicy};

    fn pod(ifname: &str, ingress: bool, egress: bool) -> PodPolicy {
        PodPolicy {
            namespace: "ns".into(),
            name: ifname.into(),
            ip: "10.244.1.1".parse().unwrap(),
            ifname: ifname.into(),
            ingress: Direction {
                isolated: ingress,
                ..Default::default()
            },
            egress: Direction {
                isolated: egress,
                ..Default::default()
            },
        }
    }

    #[test]
    fn selected_pods_ipv6_is_dropped_and_the_rest_passes() {
        let ir = PolicyIr {
            pods: vec![
                pod("sla", true, false),
                pod("slb", false, false),
                pod("slc", false, true),
            ],
            log_drops: false,
        };
        assert_eq!(
            render(&ir),
            "*filter
:SLUICE-V6-GUARD - [0:0]
-A SLUICE-V6-GUARD -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
-A SLUICE-V6-GUARD -p ipv6-icmp -m icmp6 --icmpv6-type 135 -j RETURN
-A SLUICE-V6-GUARD -p ipv6-icmp -m icmp6 --icmpv6-type 136 -j RETURN
-A SLUICE-V6-GUARD -o sla -j DROP
-A SLUICE-V6-GUARD -i sla -j RETURN
-A SLUICE-V6-GUARD -o slb -j RETURN
-A SLUICE-V6-GUARD -i slb -j RETURN
-A SLUICE-V6-GUARD -o slc -j RETURN
-A SLUICE-V6-GUARD -i slc -j DROP
-A SLUICE-V6-GUARD -o sluice+ -j RETURN
-A SLUICE-V6-GUARD -o sl+ -j DROP
-A SLUICE-V6-GUARD -i sluice+ -j RETURN
-A SLUICE-V6-GUARD -i sl+ -j DROP
COMMIT
"
        );
        // No pods known: every pod veth fails closed, sluice's own devices pass.
        let none = render(&PolicyIr::default());
        assert!(none.contains("-o sl+ -j DROP") && none.contains("-o sluice+ -j RETURN"));
        assert!(chain().len() <= 28);
    }
}

#[cfg(test)]
mod names {
    #![allow(clippy::unwrap_used)]
    use crate::firewall::Exec;
    use crate::iptables::{IptablesMode, IptablesRestore};

    #[test]
    fn the_ipv6_tools_are_named_for_the_backend() {
        for (mode, want) in [
            (IptablesMode::Nft, "ip6tables-nft-restore"),
            (IptablesMode::Legacy, "ip6tables-legacy-restore"),
        ] {
            let r = IptablesRestore::new(Exec::host(), mode);
            assert_eq!(r.bin6("iptables-restore"), want);
            assert_eq!(r.bin6("iptables"), want.trim_end_matches("-restore"));
        }
    }
}
