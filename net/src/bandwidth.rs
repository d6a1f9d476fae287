//! Traffic shaping for the CNI `bandwidth` capability (issue 21, bandwidth half).
//!
//! Deciding: [`plan`] turns `runtimeConfig.bandwidth` into a plain [`ShapingPlan`]
//! with the semantics of the containernetworking-plugins `bandwidth` plugin: rates in bits per
//! second, bursts in bits; a rate needs a burst and a burst a rate; a burst of 4 GiB (in bytes) or
//! more is refused. kubelet/containerd send the `kubernetes.io/ingress-bandwidth` /
//! `egress-bandwidth` annotations as the same object, with the burst set to `u32::MAX` bits.
//! The bucket holds at most what the rate delivers in 2^32 ns, about 4.3 s ([`bucket_cap`]), as
//! the bandwidth plugin's does in effect.
//!
//! Ingress (to the pod) is shaped by a tbf on the host veth's root qdisc; egress (from the pod) by
//! an ingress qdisc on the host veth redirecting to an ifb device named by [`ifb_name`], with a tbf
//! on the ifb. [`crate::shaping`] applies a plan over netlink and reads back an [`ObservedShaping`],
//! which [`problems`] compares with the plan for CHECK.

use serde::Deserialize;

use crate::cni::{CniError, ErrorCode};
use crate::tc::SeenTbf;
use crate::LINK_PREFIX;

/// Latency the bandwidth plugin gives every tbf (`limit` = rate × latency + burst).
pub const LATENCY_MICROS: u64 = 25_000;

/// The smallest bucket [`bucket_cap`] leaves: one full-size GSO packet.
pub const MIN_BUCKET_BYTES: u32 = 65_536;

/// The largest bucket for `rate_bytes`: what the rate delivers in 2^32 ns (about 4.3 s), never
/// below [`MIN_BUCKET_BYTES`]. The bandwidth plugin gives the burst to the kernel as a time in
/// `tc_tbf_qopt.buffer`, which the kernel caps at 2^32 ns; sluice gives it in bytes
/// (`TCA_TBF_BURST`), which the kernel does not cap, so the cap is applied here. Without it the
/// kubelet annotations' burst of `u32::MAX` bits (512 MiB) would leave a 10 Mbit/s pod unshaped
/// for its first seven minutes, behind a queue as long.
pub fn bucket_cap(rate_bytes: u64) -> u32 {
    let cap = u128::from(rate_bytes) * u128::from(u32::MAX) / 1_000_000_000;
    u32::try_from(cap).unwrap_or(u32::MAX).max(MIN_BUCKET_BYTES)
}

/// `runtimeConfig.bandwidth` as the runtime sends it. Values are unsigned: a negative or
/// non-integer value fails to decode, which the caller reports as a decoding error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BandwidthEntry {
    #[serde(default)]
    pub ingress_rate: u64,
    #[serde(default)]
    pub ingress_burst: u64,
    #[serde(default)]
    pub egress_rate: u64,
    #[serde(default)]
    pub egress_burst: u64,
}

/// One token bucket filter, in the kernel's units (bytes, bytes per second).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tbf {
    pub rate_bytes: u64,
    pub burst_bytes: u32,
    /// Queue limit in bytes: what arrives at `rate_bytes` within [`LATENCY_MICROS`], plus the burst.
    pub limit_bytes: u32,
}

/// What shaping an attachment wants; `None` on a direction means it is not shaped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShapingPlan {
    /// Traffic to the pod: tbf on the host veth.
    pub ingress: Option<Tbf>,
    /// Traffic from the pod: redirected to the ifb, tbf there.
    pub egress: Option<Tbf>,
}

impl ShapingPlan {
    pub fn is_empty(&self) -> bool {
        self.ingress.is_none() && self.egress.is_none()
    }
}

/// The ifb device of the attachment whose host veth is `host_ifname` (`sl` + 13 hex digits):
/// `sli` + the first 12 of those digits, so that DEL and GC find it from the container id alone,
/// and it never has the shape of a host veth (`i` is not a hex digit).
pub fn ifb_name(host_ifname: &str) -> String {
    let digits = host_ifname.get(LINK_PREFIX.len()..).unwrap_or("");
    let digits: String = digits.chars().take(12).collect();
    format!("{LINK_PREFIX}i{digits}")
}

/// Whether `name` has the shape of an ifb made by [`ifb_name`].
pub fn is_ifb_name(name: &str) -> bool {
    let prefix = format!("{LINK_PREFIX}i");
    name.len() == prefix.len() + 12
        && name.starts_with(&prefix)
        && name[prefix.len()..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What the kernel holds for one attachment's shaping.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ObservedShaping {
    pub host_present: bool,
    /// The host veth's root tbf.
    pub ingress: Option<SeenTbf>,
    /// Whether the host veth's ingress qdisc redirects to the attachment's ifb.
    pub redirect_to_ifb: bool,
    /// Whether the ifb is up; `None` if there is no ifb.
    pub ifb_up: Option<bool>,
    /// The ifb's root tbf.
    pub egress: Option<SeenTbf>,
}

/// What differs between the plan and what the kernel holds, one sentence each; empty when the
/// shaping is in place. A direction the plan leaves alone is not looked at.
pub fn problems(plan: &ShapingPlan, host_ifname: &str, seen: &ObservedShaping) -> Vec<String> {
    let mut out = Vec::new();
    if !seen.host_present {
        out.push(format!("host interface {host_ifname} is missing"));
        return out;
    }
    let ifb = ifb_name(host_ifname);
    let tbf = |which: &str, dev: &str, want: &Tbf, got: &Option<SeenTbf>, out: &mut Vec<String>| {
        match got {
            None => out.push(format!("{which} shaping: {dev} has no tbf")),
            Some(g) if g.rate_bytes != want.rate_bytes || g.limit_bytes != want.limit_bytes => out
                .push(format!(
                    "{which} shaping: the tbf on {dev} has rate {} bytes/s limit {} bytes, \
                     not {} bytes/s limit {} bytes",
                    g.rate_bytes, g.limit_bytes, want.rate_bytes, want.limit_bytes
                )),
            Some(_) => {}
        }
    };
    if let Some(want) = &plan.ingress {
        tbf("ingress", host_ifname, want, &seen.ingress, &mut out);
    }
    if let Some(want) = &plan.egress {
        match seen.ifb_up {
            None => out.push(format!("egress shaping: ifb {ifb} is missing")),
            Some(false) => out.push(format!("egress shaping: ifb {ifb} is down")),
            Some(true) => {
                tbf("egress", &ifb, want, &seen.egress, &mut out);
                if !seen.redirect_to_ifb {
                    out.push(format!(
                        "egress shaping: {host_ifname} does not redirect its ingress to {ifb}"
                    ));
                }
            }
        }
    }
    out
}

/// Turns the runtime's bandwidth request into a plan, or a CNI error naming what is wrong.
pub fn plan(entry: &BandwidthEntry) -> Result<ShapingPlan, CniError> {
    Ok(ShapingPlan {
        ingress: direction("ingress", entry.ingress_rate, entry.ingress_burst)?,
        egress: direction("egress", entry.egress_rate, entry.egress_burst)?,
    })
}

fn invalid(msg: String) -> CniError {
    CniError::new(ErrorCode::InvalidConfig, msg)
}

fn direction(which: &str, rate_bits: u64, burst_bits: u64) -> Result<Option<Tbf>, CniError> {
    match (rate_bits, burst_bits) {
        (0, 0) => return Ok(None),
        (0, _) => {
            return Err(invalid(format!(
                "bandwidth: {which}Burst is set, so {which}Rate must be set too"
            )))
        }
        (_, 0) => {
            return Err(invalid(format!(
                "bandwidth: {which}Rate is set, so {which}Burst must be set too"
            )))
        }
        _ => {}
    }
    let rate_bytes = rate_bits / 8;
    if rate_bytes == 0 {
        return Err(invalid(format!(
            "bandwidth: {which}Rate {rate_bits} bit/s is below the smallest rate, 8 bit/s"
        )));
    }
    let burst_bytes = u32::try_from(burst_bits / 8)
        .ok()
        .filter(|b| *b != u32::MAX)
        .ok_or_else(|| {
            invalid(format!(
                "bandwidth: {which}Burst {burst_bits} bits is 4 GiB or more, the most tbf can hold"
            ))
        })?;
    if burst_bytes == 0 {
        return Err(invalid(format!(
            "bandwidth: {which}Burst {burst_bits} bits is below the smallest burst, 8 bits"
        )));
    }
    let burst_bytes = burst_bytes.min(bucket_cap(rate_bytes));
    let in_flight = u128::from(rate_bytes) * u128::from(LATENCY_MICROS) / 1_000_000;
    let limit_bytes = u32::try_from(in_flight + u128::from(burst_bytes)).map_err(|_| {
        invalid(format!(
            "bandwidth: {which}Rate {rate_bits} bit/s with {which}Burst {burst_bits} bits needs a \
             queue of 4 GiB or more"
        ))
    })?;
    Ok(Some(Tbf {
        rate_bytes,
        burst_bytes,
        limit_bytes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ir: u64, ib: u64, er: u64, eb: u64) -> BandwidthEntry {
        BandwidthEntry {
            ingress_rate: ir,
            ingress_burst: ib,
            egress_rate: er,
            egress_burst: eb,
        }
    }

    #[test]
    fn nothing_set_is_no_shaping() {
        let p = plan(&BandwidthEntry::default()).unwrap();
        assert!(p.is_empty());
    }

    #[test]
    fn bits_become_bytes_and_limit_adds_latency() {
        let p = plan(&entry(20_000_000, 160_000, 0, 0)).unwrap();
        assert_eq!(
            p.ingress,
            Some(Tbf {
                rate_bytes: 2_500_000,
                burst_bytes: 20_000,
                // 2.5 MB/s over 25 ms = 62 500 bytes, plus the burst.
                limit_bytes: 82_500,
            })
        );
        assert_eq!(p.egress, None);
    }

    #[test]
    fn kubelet_annotation_burst_is_accepted() {
        // containerd sends the annotation's rate with a burst of u32::MAX bits.
        let p = plan(&entry(0, 0, 10_000_000, u64::from(u32::MAX))).unwrap();
        let e = p.egress.unwrap();
        assert_eq!(e.rate_bytes, 1_250_000);
        // 512 MiB asked; the bucket holds 2^32 ns of 1.25 MB/s.
        assert_eq!(e.burst_bytes, 5_368_709);
        assert_eq!(e.limit_bytes, 31_250 + 5_368_709);
    }

    #[test]
    fn the_bucket_is_capped_at_2_pow_32_ns_of_the_rate_but_not_below_64_kib() {
        assert_eq!(bucket_cap(1_000_000_000), u32::MAX);
        assert_eq!(bucket_cap(1_000), MIN_BUCKET_BYTES);
        // Bursts below the cap are kept as asked.
        let p = plan(&entry(20_000_000, 8_000_000, 0, 0)).unwrap();
        assert_eq!(p.ingress.unwrap().burst_bytes, 1_000_000);
        // A slow rate with a big burst gets the 64 KiB floor.
        let p = plan(&entry(8_000, 80_000_000, 0, 0)).unwrap();
        assert_eq!(p.ingress.unwrap().burst_bytes, MIN_BUCKET_BYTES);
    }

    #[test]
    fn rate_without_burst_and_burst_without_rate_are_refused() {
        let e = plan(&entry(1_000_000, 0, 0, 0)).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidConfig);
        assert!(e.msg.contains("ingressBurst"), "{}", e.msg);
        let e = plan(&entry(0, 0, 0, 8_000)).unwrap_err();
        assert!(e.msg.contains("egressRate"), "{}", e.msg);
    }

    #[test]
    fn burst_of_4gib_or_more_is_refused() {
        let e = plan(&entry(1_000_000, u64::from(u32::MAX) * 8, 0, 0)).unwrap_err();
        assert!(e.msg.contains("4 GiB"), "{}", e.msg);
        assert!(plan(&entry(1_000_000, u64::MAX, 0, 0)).is_err());
        // The largest burst tbf holds passes when the queue still fits (a rate of 1 byte/s).
        assert!(plan(&entry(8, (u64::from(u32::MAX) - 1) * 8, 0, 0)).is_ok());
    }

    #[test]
    fn too_small_values_are_refused() {
        assert!(plan(&entry(7, 8_000, 0, 0)).is_err());
        assert!(plan(&entry(8_000, 7, 0, 0)).is_err());
    }

    #[test]
    fn huge_rate_overflowing_the_queue_is_refused() {
        let e = plan(&entry(u64::MAX, 8_000, 0, 0)).unwrap_err();
        assert!(e.msg.contains("queue"), "{}", e.msg);
    }

    #[test]
    fn negative_or_fractional_values_fail_to_decode() {
        assert!(serde_json::from_str::<BandwidthEntry>(r#"{"ingressRate":-1}"#).is_err());
        assert!(serde_json::from_str::<BandwidthEntry>(r#"{"egressBurst":1.5}"#).is_err());
        assert!(
            serde_json::from_str::<BandwidthEntry>(r#"{"ingressRate":18446744073709551616}"#)
                .is_err()
        );
        let e: BandwidthEntry =
            serde_json::from_str(r#"{"ingressRate":20000000,"ingressBurst":160000}"#).unwrap();
        assert_eq!(e, entry(20_000_000, 160_000, 0, 0));
    }

    #[test]
    fn ifb_name_is_deterministic_and_not_a_host_veth() {
        let host = crate::podnet::host_ifname("abc123", "eth0");
        let ifb = ifb_name(&host);
        assert_eq!(ifb, ifb_name(&crate::podnet::host_ifname("abc123", "eth0")));
        assert_eq!(ifb.len(), 15);
        assert!(ifb.starts_with("sli"));
        assert!(!crate::podnet::is_host_ifname(&ifb));
        assert_ne!(ifb, ifb_name(&crate::podnet::host_ifname("abc124", "eth0")));
        assert!(is_ifb_name(&ifb));
        assert!(!is_ifb_name(&host));
        assert!(!is_ifb_name("sliXYZ456789abc"));
        assert!(!is_ifb_name("sli0123"));
    }

    fn seen_as_planned(p: &ShapingPlan) -> ObservedShaping {
        let seen = |t: &Option<Tbf>| {
            t.map(|t| SeenTbf {
                rate_bytes: t.rate_bytes,
                limit_bytes: t.limit_bytes,
            })
        };
        ObservedShaping {
            host_present: true,
            ingress: seen(&p.ingress),
            redirect_to_ifb: p.egress.is_some(),
            ifb_up: p.egress.map(|_| true),
            egress: seen(&p.egress),
        }
    }

    #[test]
    fn problems_name_what_differs() {
        let p = plan(&entry(20_000_000, 160_000, 8_000_000, 80_000)).unwrap();
        let ok = seen_as_planned(&p);
        assert!(problems(&p, "slabc", &ok).is_empty());
        let gone = ObservedShaping::default();
        assert_eq!(
            problems(&p, "slabc", &gone),
            ["host interface slabc is missing"]
        );
        let mut other_rate = ok;
        other_rate.ingress = Some(SeenTbf {
            rate_bytes: 1,
            limit_bytes: 82_500,
        });
        let msgs = problems(&p, "slabc", &other_rate);
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        assert!(msgs[0].contains("rate 1 bytes/s"), "{msgs:?}");
        let mut no_redirect = ok;
        no_redirect.redirect_to_ifb = false;
        assert!(problems(&p, "slabc", &no_redirect)[0].contains("redirect"));
        let mut ifb_down = ok;
        ifb_down.ifb_up = Some(false);
        assert!(problems(&p, "slabc", &ifb_down)[0].contains("down"));
        let mut no_ifb = ok;
        no_ifb.ifb_up = None;
        no_ifb.egress = None;
        assert!(problems(&p, "slabc", &no_ifb)[0].contains("missing"));
        // Unplanned directions are not looked at.
        let only_in = plan(&entry(20_000_000, 160_000, 0, 0)).unwrap();
        assert!(problems(&only_in, "slabc", &no_ifb).is_empty());
    }
}
