//! Cutting established flows that a new policy denies. The kernel's `ct state established`
//! accept would otherwise keep them passing; once their conntrack entry is gone, the next
//! packet is evaluated as new (TCP pick-up) and meets the policy.
//!
//! Mechanism: the flows of both families are read in one read of `/proc/net/nf_conntrack`
//! (where the kernel has it; else `conntrack -L` lists the IPv4 flows, and the IPv6 ones when
//! a local pod has an IPv6 address: each such call is a process and a netlink dump that walks
//! every bucket of the host's conntrack hash, all namespaces', some 15 ms at 262144 buckets
//! however few entries this namespace holds). [`denied`] (pure) picks those the IR no longer
//! allows (judged as the forward hook saw them: original source, destination after DNAT = the
//! reply's source, its port), and they are deleted: those with ports one by one by their exact
//! tuple over ctnetlink ([`netlink`], a hash lookup each), the others (ICMP; or all, should
//! netlink fail) by the `conntrack` binary (conntrack-tools; called, not linked), one
//! `conntrack -D` per (source, destination, protocol, destination port, reply source and port)
//! group (one process per flow took tens of seconds when a probe or a scanner had left
//! hundreds of entries, blocking the policy loop). Entries that cannot carry a packet as
//! established are left alone: those that never saw a reply (their next packet is new, so the
//! policy judges it) and TCP entries in TIME_WAIT or CLOSE (a new SYN on them is a new flow).

pub mod netlink;

use crate::firewall::{Exec, FirewallError};
use crate::ir::{Family, PolicyIr};
use std::net::IpAddr;

/// One conntrack entry, its original and reply tuples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub reply_src: IpAddr,
    pub reply_sport: Option<u16>,
    /// The conntrack zone (0 unless a rule set one).
    pub zone: u16,
    /// Whether a packet of this flow can pass as established: a reply was seen and, for TCP,
    /// the connection is not closed.
    pub live: bool,
}

/// Flows from `conntrack -L -f ipv4` (or `-f ipv6`) text, or from `/proc/net/nf_conntrack`
/// (the same lines after the family's name and number, addresses written out in full); lines
/// that do not parse are skipped.
pub fn parse_list(text: &str) -> Vec<Flow> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Flow> {
    let mut words = line.split_whitespace().peekable();
    if words.next_if(|w| matches!(*w, "ipv4" | "ipv6")).is_some() {
        let _family_number = words.next()?;
    }
    let _name = words.next()?;
    let proto: u8 = words.next()?.parse().ok()?;
    let mut src = Vec::new();
    let mut dst = Vec::new();
    let mut sport = Vec::new();
    let mut dport = Vec::new();
    let (mut unreplied, mut assured, mut closed) = (false, false, false);
    let mut zone = 0;
    for w in words {
        let Some((k, v)) = w.split_once('=') else {
            match w {
                "[UNREPLIED]" => unreplied = true,
                "[ASSURED]" => assured = true,
                "TIME_WAIT" | "CLOSE" => closed = true,
                _ => {}
            }
            continue;
        };
        match k {
            "src" => src.push(v.parse::<IpAddr>().ok()?),
            "dst" => dst.push(v.parse::<IpAddr>().ok()?),
            "sport" => sport.push(v.parse::<u16>().ok()?),
            "dport" => dport.push(v.parse::<u16>().ok()?),
            "zone" => zone = v.parse::<u16>().ok()?,
            _ => {}
        }
    }
    Some(Flow {
        proto,
        src: *src.first()?,
        dst: *dst.first()?,
        sport: sport.first().copied(),
        dport: dport.first().copied(),
        reply_src: *src.get(1)?,
        reply_sport: sport.get(1).copied(),
        zone,
        live: (assured || !unreplied) && !closed,
    })
}

/// The flows of `flows` that policy judges: IPv6 ones only where a local pod has an IPv6
/// address (no other IPv6 flow is policy's).
pub fn policy_flows(ir: &PolicyIr, flows: Vec<Flow>) -> Vec<Flow> {
    flows
        .into_iter()
        .filter(|f| f.src.is_ipv4() || ir.has(Family::V6))
        .collect()
}

/// The live flows `ir` would not let start.
pub fn denied<'a>(ir: &PolicyIr, flows: &'a [Flow]) -> Vec<&'a Flow> {
    let pods = ir.by_ip();
    flows
        .iter()
        .filter(|f| f.live && !pods.allows(f.src, f.reply_src, f.proto, f.reply_sport))
        .collect()
}

/// `conntrack -D` arguments deleting every flow with `flow`'s source, destination, protocol,
/// destination port and reply source and port: flows that share all of these share their
/// verdict, so one call deletes them all and nothing the policy allows.
pub fn delete_group_args(flow: &Flow) -> Vec<String> {
    let mut a = delete_args(&Flow {
        sport: None,
        ..flow.clone()
    });
    a.extend(["--reply-src".into(), flow.reply_src.to_string()]);
    if matches!(flow.proto, 6 | 17 | 132) {
        if let Some(d) = flow.dport {
            a.extend(["--orig-port-dst".into(), d.to_string()]);
        }
        if let Some(r) = flow.reply_sport {
            a.extend(["--reply-port-src".into(), r.to_string()]);
        }
    }
    a
}

/// `conntrack -D` arguments deleting exactly `flow`.
pub fn delete_args(flow: &Flow) -> Vec<String> {
    let family = match flow.src {
        IpAddr::V4(_) => "ipv4",
        IpAddr::V6(_) => "ipv6",
    };
    let mut a: Vec<String> = vec![
        "-D".into(),
        "-f".into(),
        family.into(),
        "-p".into(),
        match flow.proto {
            1 => "icmp".into(),
            58 => "icmpv6".into(),
            6 => "tcp".into(),
            17 => "udp".into(),
            132 => "sctp".into(),
            n => n.to_string(),
        },
        "-s".into(),
        flow.src.to_string(),
        "-d".into(),
        flow.dst.to_string(),
    ];
    if matches!(flow.proto, 6 | 17 | 132) {
        if let (Some(s), Some(d)) = (flow.sport, flow.dport) {
            a.extend([
                "--orig-port-src".into(),
                s.to_string(),
                "--orig-port-dst".into(),
                d.to_string(),
            ]);
        }
    }
    a
}

/// The conntrack table of the reading thread's network namespace, both families: the same
/// namespace the netlink deletes and the binaries act in (`/proc/self` would be the main
/// thread's).
const PROC_TABLE: &str = "/proc/thread-self/net/nf_conntrack";

/// `conntrack -D` processes run at once by [`ConntrackCli::flush_denied`].
const DELETERS: usize = 8;

/// Conntrack through `/proc/net/nf_conntrack` and ctnetlink where they serve, the `conntrack`
/// binary where they do not.
#[derive(Debug, Clone)]
pub struct ConntrackCli {
    pub exec: Exec,
    pub program: String,
}

impl ConntrackCli {
    pub fn new(exec: Exec) -> Self {
        Self {
            exec,
            program: "conntrack".into(),
        }
    }

    /// Whether the binary is there (without it, only flows with ports can be cut, and only
    /// where [`Self::reads_table`]).
    pub fn available(&self) -> bool {
        self.exec.has(&self.program)
    }

    /// Whether the kernel's table can be read without the binary.
    pub fn reads_table(&self) -> bool {
        self.read_table().is_some()
    }

    /// Deletes the entries of every flow `ir` denies; how many were deleted (a flow deleted
    /// over netlink counts one, a group of flows (see [`delete_group_args`]) deleted by the
    /// binary one). Call it right after the firewall applied `ir`, so that a flow cannot come
    /// back as established.
    pub fn flush_denied(&self, ir: &PolicyIr) -> Result<usize, FirewallError> {
        let flows = match self.read_table() {
            Some(text) => policy_flows(ir, parse_list(&text)),
            None => self.list(ir)?,
        };
        self.delete_denied(ir, &flows)
    }

    /// Both families' flows in one read of [`PROC_TABLE`] (no process where binaries run in
    /// the caller's namespace, and no dump of the host's whole hash); `None` where the kernel
    /// has no such file.
    fn read_table(&self) -> Option<String> {
        if self.exec.wrapper.is_empty() {
            return std::fs::read_to_string(PROC_TABLE).ok();
        }
        let out = self.exec.run("cat", &[PROC_TABLE], None).ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The flows `conntrack -L` lists, IPv4 and (when a local pod has an IPv6 address) IPv6.
    fn list(&self, ir: &PolicyIr) -> Result<Vec<Flow>, FirewallError> {
        let mut flows = Vec::new();
        for family in Family::BOTH {
            // IPv6 flows only where a pod has an IPv6 address (no other IPv6 flow is policy's).
            let name = match family {
                Family::V4 => "ipv4",
                Family::V6 if ir.has(Family::V6) => "ipv6",
                Family::V6 => continue,
            };
            let out = self.exec.run(&self.program, &["-L", "-f", name], None)?;
            if !out.status.success() {
                return Err(FirewallError::Command {
                    program: self.program.clone(),
                    op: "list",
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                });
            }
            flows.extend(parse_list(&String::from_utf8_lossy(&out.stdout)));
        }
        Ok(flows)
    }

    /// Deletes the flows of `flows` that `ir` denies: those with ports one by one over
    /// ctnetlink ([`netlink`]; where binaries run in the caller's namespace or a named one),
    /// the rest (or all, should the socket fail) by group with `conntrack -D`; how many flows
    /// and groups were deleted.
    fn delete_denied(&self, ir: &PolicyIr, flows: &[Flow]) -> Result<usize, FirewallError> {
        let mut deleted = 0;
        let (exact, mut rest): (Vec<&Flow>, Vec<&Flow>) = denied(ir, flows)
            .into_iter()
            .partition(|f| netlink::has_exact_tuple(f));
        let netns = self.exec.netns();
        if !exact.is_empty() && (netns.is_some() || self.exec.wrapper.is_empty()) {
            match netlink::delete_flows(netns, &exact) {
                Ok(n) => deleted += n,
                Err(partly) => {
                    tracing::warn!(error = %partly.error, deleted = partly.deleted, left = exact.len() - partly.failed_from, "deleting conntrack entries over netlink failed; deleting the rest with conntrack -D");
                    deleted += partly.deleted;
                    rest.extend(exact.get(partly.failed_from..).unwrap_or_default());
                }
            }
        } else {
            rest.extend(exact);
        }
        let mut groups: Vec<Vec<String>> = rest.into_iter().map(delete_group_args).collect();
        groups.sort();
        groups.dedup();
        // A few at once: each call is a process, and the policy loop waits for all of them.
        let width = groups.len().div_ceil(DELETERS).max(1);
        let results: Vec<Result<usize, FirewallError>> = std::thread::scope(|scope| {
            let workers: Vec<_> = groups
                .chunks(width)
                .map(|chunk| {
                    scope.spawn(move || {
                        let mut n = 0;
                        for args in chunk {
                            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                            // Exit 1 with "0 flow entries" when the flows ended meanwhile.
                            if self.exec.run(&self.program, &refs, None)?.status.success() {
                                n += 1;
                            }
                        }
                        Ok(n)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join().unwrap_or_else(|_| {
                        Err(FirewallError::Command {
                            program: "conntrack".into(),
                            op: "delete",
                            stderr: "a deleting thread panicked".into(),
                        })
                    })
                })
                .collect()
        });
        for r in results {
            deleted += r?;
        }
        if deleted > 0 {
            tracing::info!(deleted, "conntrack entries of denied flows deleted");
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ir::{Direction, PodPolicy};

    const LIST: &str = "tcp      6 431999 ESTABLISHED src=10.244.1.2 dst=10.244.1.1 sport=40000 dport=80 src=10.244.1.1 dst=10.244.1.2 sport=80 dport=40000 [ASSURED] mark=0 use=1\n\
udp      17 29 src=10.244.1.3 dst=10.96.0.10 sport=5000 dport=53 [UNREPLIED] src=10.244.1.1 dst=10.244.1.3 sport=5353 dport=5000 mark=0 use=1\n\
icmp     1 29 src=10.244.1.2 dst=10.244.1.1 type=8 code=0 id=7 src=10.244.1.1 dst=10.244.1.2 type=0 code=0 id=7 mark=0 use=1\n\
conntrack v1.4.7 (conntrack-tools): 3 flow entries have been shown.\n";

    #[test]
    fn flows_parse_with_both_tuples() {
        let flows = parse_list(LIST);
        assert_eq!(flows.len(), 3);
        assert_eq!(flows[1].proto, 17);
        assert_eq!(flows[1].dst, "10.96.0.10".parse::<IpAddr>().unwrap());
        assert_eq!(flows[1].reply_src, "10.244.1.1".parse::<IpAddr>().unwrap());
        assert_eq!(flows[1].reply_sport, Some(5353));
        assert_eq!(flows[2].sport, None);
    }

    #[test]
    fn denied_flows_are_judged_after_dnat() {
        let pod = PodPolicy {
            namespace: "x".into(),
            name: "a".into(),
            ips: vec!["10.244.1.1".parse().unwrap()],
            ifname: "sla".into(),
            ingress: Direction {
                isolated: true,
                ..Default::default()
            },
            egress: Direction::default(),
        };
        let ir = PolicyIr {
            pods: vec![pod],
            log_drops: false,
        };
        let flows = parse_list(LIST);
        // The UDP flow never saw a reply: its next packet is new, judged by the rules.
        assert!(!flows[1].live);
        assert_eq!(denied(&ir, &flows).len(), 2);
        assert_eq!(denied(&PolicyIr::default(), &flows).len(), 0);
        assert_eq!(
            delete_args(&flows[1]).join(" "),
            "-D -f ipv4 -p udp -s 10.244.1.3 -d 10.96.0.10 --orig-port-src 5000 --orig-port-dst 53"
        );
        assert_eq!(
            delete_args(&flows[2]).join(" "),
            "-D -f ipv4 -p icmp -s 10.244.1.2 -d 10.244.1.1"
        );
    }

    #[test]
    fn closed_and_unreplied_flows_are_not_live_and_groups_share_a_verdict() {
        let text = "tcp      6 119 TIME_WAIT src=10.244.0.2 dst=10.244.1.1 sport=40000 dport=80 src=10.244.1.1 dst=10.244.0.2 sport=80 dport=40000 [ASSURED] mark=0 use=1\n\
tcp      6 119 SYN_SENT src=10.244.0.2 dst=10.244.1.1 sport=40001 dport=80 [UNREPLIED] src=10.244.1.1 dst=10.244.0.2 sport=80 dport=40001 mark=0 use=1\n\
udp      17 28 src=10.244.0.2 dst=10.244.1.1 sport=5000 dport=80 src=10.244.1.1 dst=10.244.0.2 sport=80 dport=5000 mark=0 use=1\n";
        let flows = parse_list(text);
        assert_eq!(
            flows.iter().map(|f| f.live).collect::<Vec<_>>(),
            [false, false, true]
        );
        assert_eq!(
            delete_group_args(&flows[2]).join(" "),
            "-D -f ipv4 -p udp -s 10.244.0.2 -d 10.244.1.1 --reply-src 10.244.1.1 --orig-port-dst 80 --reply-port-src 80"
        );
    }

    #[test]
    fn ipv6_flows_are_judged_and_cut_as_ipv6() {
        let text = "tcp      6 431999 ESTABLISHED src=fd00:10:244:2::5 dst=fd00:10:244:1::1 sport=40000 dport=80 src=fd00:10:244:1::1 dst=fd00:10:244:2::5 sport=80 dport=40000 [ASSURED] mark=0 use=1\n\
icmpv6   58 29 src=fd00:10:244:2::5 dst=fd00:10:244:1::1 type=128 code=0 id=9 src=fd00:10:244:1::1 dst=fd00:10:244:2::5 type=129 code=0 id=9 mark=0 use=1\n\
tcp      6 431999 ESTABLISHED src=fd00:10:244:2::5 dst=fd00:10:244:1::9 sport=40001 dport=80 src=fd00:10:244:1::9 dst=fd00:10:244:2::5 sport=80 dport=40001 [ASSURED] mark=0 use=1\n";
        let flows = parse_list(text);
        assert_eq!(flows.len(), 3);
        // The pod is dual-stack; its IPv4 address is not in any of these flows.
        let pod = PodPolicy {
            namespace: "x".into(),
            name: "a".into(),
            ips: vec![
                "10.244.1.1".parse().unwrap(),
                "fd00:10:244:1::1".parse().unwrap(),
            ],
            ifname: "sla".into(),
            ingress: Direction {
                isolated: true,
                ..Default::default()
            },
            egress: Direction::default(),
        };
        let ir = PolicyIr {
            pods: vec![pod],
            log_drops: false,
        };
        let denied: Vec<&Flow> = denied(&ir, &flows);
        // The flow to another address (no pod of this node) is not policy's.
        assert_eq!(denied.len(), 2);
        assert_eq!(
            delete_group_args(denied[0]).join(" "),
            "-D -f ipv6 -p tcp -s fd00:10:244:2::5 -d fd00:10:244:1::1 --reply-src fd00:10:244:1::1 --orig-port-dst 80 --reply-port-src 80"
        );
        assert_eq!(
            delete_args(denied[1]).join(" "),
            "-D -f ipv6 -p icmpv6 -s fd00:10:244:2::5 -d fd00:10:244:1::1"
        );
        // `/proc/net/nf_conntrack` says the same, both families in one table, after each
        // line's family (name and number) and with the addresses written out in full.
        let proc_text = "ipv4     2 udp      17 28 src=10.244.0.2 dst=10.244.1.1 sport=5000 dport=80 src=10.244.1.1 dst=10.244.0.2 sport=80 dport=5000 mark=0 zone=0 use=2\n\
ipv6     10 tcp      6 431999 ESTABLISHED src=fd00:0010:0244:0002:0000:0000:0000:0005 dst=fd00:0010:0244:0001:0000:0000:0000:0001 sport=40000 dport=80 src=fd00:0010:0244:0001:0000:0000:0000:0001 dst=fd00:0010:0244:0002:0000:0000:0000:0005 sport=80 dport=40000 [ASSURED] mark=0 zone=0 use=2\n\
ipv6     10 icmpv6   58 29 src=fd00:0010:0244:0002:0000:0000:0000:0005 dst=fd00:0010:0244:0001:0000:0000:0000:0001 type=128 code=0 id=9 src=fd00:0010:0244:0001:0000:0000:0000:0001 dst=fd00:0010:0244:0002:0000:0000:0000:0005 type=129 code=0 id=9 mark=0 zone=0 use=2\n\
ipv6     10 tcp      6 119 TIME_WAIT src=fd00:0010:0244:0002:0000:0000:0000:0005 dst=fd00:0010:0244:0001:0000:0000:0000:0001 sport=39999 dport=80 src=fd00:0010:0244:0001:0000:0000:0000:0001 dst=fd00:0010:0244:0002:0000:0000:0000:0005 sport=80 dport=39999 [ASSURED] mark=0 zone=0 use=2\n\
ipv6     10\n";
        let from_proc = parse_list(proc_text);
        assert_eq!(from_proc.len(), 4);
        assert_eq!(from_proc[0].src, "10.244.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(from_proc[0].reply_sport, Some(80));
        assert_eq!(from_proc[1..3], flows[..2]);
        assert!(!from_proc[3].live);
        // One read, both families: the IPv4 flow to the pod is denied as well.
        let groups: Vec<Vec<String>> = super::denied(&ir, &from_proc)
            .into_iter()
            .map(delete_group_args)
            .collect();
        assert_eq!(groups.len(), 3);
        assert_eq!(groups[0][..3], ["-D", "-f", "ipv4"]);
        assert_eq!(
            groups[1..],
            denied
                .iter()
                .map(|f| delete_group_args(f))
                .collect::<Vec<_>>()
        );
        // An IPv4-only policy reading never lists IPv6 flows: no pod has an IPv6 address.
        assert_eq!(policy_flows(&ir, from_proc.clone()), from_proc);
        let v4_only = PolicyIr {
            pods: vec![PodPolicy {
                ips: vec!["10.244.1.1".parse().unwrap()],
                ..ir.pods[0].clone()
            }],
            log_drops: false,
        };
        let kept = policy_flows(&v4_only, from_proc.clone());
        assert_eq!(kept, from_proc[..1]);
        // Flows with both ports and in zone 0 are deleted by their tuple; another zone's and
        // ICMP's by the binary.
        assert!(netlink::has_exact_tuple(&from_proc[1]));
        assert!(!netlink::has_exact_tuple(&from_proc[2]));
        let zoned = parse_list(
            &proc_text
                .lines()
                .nth(1)
                .unwrap()
                .replace("zone=0", "zone=7"),
        );
        assert_eq!(zoned[0].zone, 7);
        assert!(!netlink::has_exact_tuple(&zoned[0]));
    }
}
