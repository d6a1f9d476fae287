//! The few sysctls the agent keeps set. A container's `/proc/sys` is read-only, so where writing
//! there fails the agent writes through the host's `/proc/sys/net`, which the manifest mounts at
//! `/host/proc/sys/net` (as Cilium's does); both show the agent's own (host) network namespace.

/// Makes `/proc/sys/KEY` (a `net/...` key) read `value`; Ok(true) when it had to change it.
pub fn ensure(key: &str, value: &str) -> Result<bool, String> {
    let own = format!("/proc/sys/{key}");
    if std::fs::read_to_string(&own).is_ok_and(|v| v.trim() == value) {
        return Ok(false);
    }
    let mut errors = Vec::new();
    for path in [own, format!("/host/proc/sys/{key}")] {
        match std::fs::write(&path, value) {
            Ok(()) => return Ok(true),
            Err(e) => errors.push(format!("{path}: {e}")),
        }
    }
    Err(format!(
        "{} is not {value} and cannot be set ({})",
        key.replace('/', "."),
        errors.join("; ")
    ))
}

/// The forwarding sysctls a node needs, in order: IPv4 forwarding always; on a node with an
/// IPv6 subnet, IPv6 forwarding too. Switching IPv6 forwarding on makes the kernel ignore
/// router advertisements on links whose `accept_ra` is 1 (accept only when not forwarding),
/// which would let a default route learnt from them on the uplink expire: so where the underlay
/// link accepts them now (`accept_ra` 1), it is set to 2 (accept while forwarding). A link that
/// accepts none (0) or already accepts them forwarding (2) is left as it is. Pure: the current
/// value of the underlay's `accept_ra` is passed in (None when unreadable: left alone).
pub fn forwarding_plan(
    ipv6: bool,
    underlay: &str,
    underlay_accept_ra: Option<&str>,
) -> Vec<(String, &'static str)> {
    let mut out = vec![("net/ipv4/ip_forward".to_string(), "1")];
    if ipv6 {
        if underlay_accept_ra.map(str::trim) == Some("1") && !underlay.is_empty() {
            out.push((format!("net/ipv6/conf/{underlay}/accept_ra"), "2"));
        }
        out.push(("net/ipv6/conf/all/forwarding".to_string(), "1"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::forwarding_plan;

    #[test]
    fn ipv4_only_nodes_forward_ipv4_only() {
        assert_eq!(
            forwarding_plan(false, "eth0", Some("1")),
            vec![("net/ipv4/ip_forward".to_string(), "1")]
        );
    }

    #[test]
    fn ipv6_forwarding_keeps_the_uplinks_router_advertisements() {
        // accept_ra 1 would stop accepting RAs once forwarding: 2 first, then forwarding.
        assert_eq!(
            forwarding_plan(true, "eth0", Some("1\n")),
            vec![
                ("net/ipv4/ip_forward".to_string(), "1"),
                ("net/ipv6/conf/eth0/accept_ra".to_string(), "2"),
                ("net/ipv6/conf/all/forwarding".to_string(), "1"),
            ]
        );
        for left in [Some("0"), Some("2"), None] {
            assert_eq!(
                forwarding_plan(true, "eth0", left),
                vec![
                    ("net/ipv4/ip_forward".to_string(), "1"),
                    ("net/ipv6/conf/all/forwarding".to_string(), "1"),
                ],
                "{left:?}"
            );
        }
    }
}
