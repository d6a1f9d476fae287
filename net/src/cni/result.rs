//! The ADD result, shaped for the version the runtime asked for and merged into `prevResult`
//! when sluice is chained after another plugin.

use super::CniVersion;
use crate::podnet::{GATEWAY, GATEWAY_V6};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::{json, Map, Value};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    /// The netns path for interfaces inside the container; `None` for host-side ones.
    pub sandbox: Option<String>,
    pub mtu: Option<u32>,
}

/// An address of either family in a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfigAny {
    pub address: IpNet,
    pub gateway: Option<IpAddr>,
    /// Index into this result's own `interfaces`.
    pub interface: Option<usize>,
}

/// A route of either family in a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteAny {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
}

/// A result whose `ips` and `routes` may be of both families (dual-stack and IPv6-only pods).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AddResultAny {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfigAny>,
    pub routes: Vec<RouteAny>,
}

/// The result of wiring one pod: the host-side veth and the pod's interface (`interfaces` 0 and
/// 1), and for each family it has an address of, that address as a host route (/32, /128) via
/// the family's link-local gateway ([`GATEWAY`], [`GATEWAY_V6`]) and a default route through it.
/// IPv4 comes first, as in the node's `spec.podCIDRs` of a dual-stack cluster.
pub fn pod_result(
    host: Interface,
    pod: Interface,
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
) -> AddResultAny {
    let mut out = AddResultAny {
        interfaces: vec![host, pod],
        ..Default::default()
    };
    if let Some(ip) = v4 {
        out.ips.push(IpConfigAny {
            address: IpNet::V4(Ipv4Net::from(ip)),
            gateway: Some(IpAddr::V4(GATEWAY)),
            interface: Some(1),
        });
        out.routes.push(RouteAny {
            dst: IpNet::V4(Ipv4Net::default()),
            gw: Some(IpAddr::V4(GATEWAY)),
        });
    }
    if let Some(ip) = v6 {
        out.ips.push(IpConfigAny {
            address: IpNet::V6(Ipv6Net::from(ip)),
            gateway: Some(IpAddr::V6(GATEWAY_V6)),
            interface: Some(1),
        });
        out.routes.push(RouteAny {
            dst: IpNet::V6(Ipv6Net::default()),
            gw: Some(IpAddr::V6(GATEWAY_V6)),
        });
    }
    out
}

impl AddResultAny {
    /// The result JSON for `version`. With `prev` (the chain's `prevResult`), sluice's interfaces,
    /// addresses and routes are appended to it and everything else it carries is kept; `dns` from
    /// the network configuration is used when the chain has none. Before 1.0.0 each address says
    /// its family (`"version": "4"` or `"6"`).
    pub fn render(&self, version: CniVersion, prev: Option<&Value>, dns: Option<&Value>) -> Value {
        let mut out: Map<String, Value> = prev
            .and_then(|p| p.as_object().cloned())
            .unwrap_or_default();
        out.insert("cniVersion".into(), version.as_str().into());

        let mut interfaces = take_array(&mut out, "interfaces");
        let offset = interfaces.len();
        interfaces.extend(self.interfaces.iter().map(|i| render_interface(i, version)));

        let mut ips = take_array(&mut out, "ips");
        // A chained address whose interface index points past the chain's interfaces names
        // nothing; left as it is, it would name the interface sluice appends at that index.
        for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
            if ip
                .get("interface")
                .and_then(Value::as_u64)
                .is_some_and(|i| i >= offset as u64)
            {
                ip.remove("interface");
            }
        }
        ips.extend(self.ips.iter().map(|ip| {
            let mut o = Map::new();
            if version < CniVersion::V1_0_0 {
                let family = match ip.address {
                    IpNet::V4(_) => "4",
                    IpNet::V6(_) => "6",
                };
                o.insert("version".into(), family.into());
            }
            o.insert("address".into(), ip.address.to_string().into());
            if let Some(gw) = ip.gateway {
                o.insert("gateway".into(), gw.to_string().into());
            }
            if let Some(i) = ip.interface {
                o.insert("interface".into(), (i + offset).into());
            }
            Value::Object(o)
        }));

        let mut routes = take_array(&mut out, "routes");
        for r in &self.routes {
            let dst = r.dst.to_string();
            if routes
                .iter()
                .any(|existing| existing.get("dst").and_then(Value::as_str) == Some(dst.as_str()))
            {
                continue;
            }
            let mut o = Map::new();
            o.insert("dst".into(), dst.into());
            if let Some(gw) = r.gw {
                o.insert("gw".into(), gw.to_string().into());
            }
            routes.push(Value::Object(o));
        }

        out.insert("interfaces".into(), interfaces.into());
        out.insert("ips".into(), ips.into());
        out.insert("routes".into(), routes.into());
        if !out.contains_key("dns") {
            out.insert("dns".into(), dns.cloned().unwrap_or_else(|| json!({})));
        }
        Value::Object(out)
    }
}

fn render_interface(i: &Interface, version: CniVersion) -> Value {
    let mut o = Map::new();
    o.insert("name".into(), i.name.clone().into());
    o.insert("mac".into(), i.mac.clone().into());
    if let Some(mtu) = i.mtu.filter(|_| version >= CniVersion::V1_1_0) {
        o.insert("mtu".into(), mtu.into());
    }
    if let Some(s) = &i.sandbox {
        o.insert("sandbox".into(), s.clone().into());
    }
    Value::Object(o)
}

fn take_array(out: &mut Map<String, Value>, key: &str) -> Vec<Value> {
    match out.remove(key) {
        Some(Value::Array(a)) => a,
        _ => Vec::new(),
    }
}

/// The address `prev` (a `prevResult`) assigns to the interface `ifname` inside a sandbox, if any.
pub fn address_of(prev: &Value, ifname: &str) -> Option<Ipv4Net> {
    addresses_of(prev, ifname)
        .into_iter()
        .find_map(|a| match a {
            IpNet::V4(a) => Some(a),
            IpNet::V6(_) => None,
        })
}

/// The IPv6 address `prev` assigns to the interface `ifname` inside a sandbox, if any.
pub fn address_of_v6(prev: &Value, ifname: &str) -> Option<Ipv6Net> {
    addresses_of(prev, ifname)
        .into_iter()
        .find_map(|a| match a {
            IpNet::V6(a) => Some(a),
            IpNet::V4(_) => None,
        })
}

/// Every address, of either family, `prev` assigns to the interface `ifname` inside a sandbox.
fn addresses_of(prev: &Value, ifname: &str) -> Vec<IpNet> {
    let Some(interfaces) = prev.get("interfaces").and_then(Value::as_array) else {
        return Vec::new();
    };
    let Some(index) = interfaces.iter().position(|i| {
        i.get("name").and_then(Value::as_str) == Some(ifname)
            && i.get("sandbox").is_some_and(|s| !s.is_null())
    }) else {
        return Vec::new();
    };
    prev.get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|ip| ip.get("interface").and_then(Value::as_u64) == Some(index as u64))
        .filter_map(|ip| ip.get("address")?.as_str()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4-only pod's result.
    fn sample() -> AddResultAny {
        let (host, pod) = interfaces();
        pod_result(host, pod, Some(Ipv4Addr::new(10, 244, 3, 5)), None)
    }

    #[test]
    fn shapes_each_version() {
        let r = sample();
        for v in [CniVersion::V0_3_0, CniVersion::V0_3_1, CniVersion::V0_4_0] {
            let j = r.render(v, None, None);
            assert_eq!(j["cniVersion"], v.as_str());
            assert_eq!(j["ips"][0]["version"], "4", "{v}");
            assert!(j["interfaces"][0].get("mtu").is_none());
        }
        let j = r.render(CniVersion::V1_0_0, None, None);
        assert!(j["ips"][0].get("version").is_none());
        assert!(j["interfaces"][1].get("mtu").is_none());
        let j = r.render(CniVersion::V1_1_0, None, None);
        assert_eq!(j["interfaces"][1]["mtu"], 1450);
        assert_eq!(j["interfaces"][1]["sandbox"], "/run/netns/p");
        assert!(j["interfaces"][0].get("sandbox").is_none());
        assert_eq!(j["ips"][0]["address"], "10.244.3.5/32");
        assert_eq!(j["ips"][0]["gateway"], "169.254.1.1");
        assert_eq!(j["ips"][0]["interface"], 1);
        assert_eq!(
            j["routes"],
            json!([{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}])
        );
        assert_eq!(j["dns"], json!({}));
    }

    #[test]
    fn chains_onto_a_previous_result() {
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "dummy0", "mac": "aa:aa:aa:aa:aa:aa"}],
            "ips": [{"address": "192.168.9.9/24", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "192.168.9.1"}],
            "dns": {"nameservers": ["1.1.1.1"]},
            "custom": "kept"
        });
        let j = sample().render(
            CniVersion::V1_0_0,
            Some(&prev),
            Some(&json!({"nameservers": ["9.9.9.9"]})),
        );
        assert_eq!(j["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(
            j["ips"][1]["interface"], 2,
            "sluice's interface index is shifted past the previous ones"
        );
        assert_eq!(
            j["routes"].as_array().unwrap().len(),
            1,
            "an existing default route is not duplicated"
        );
        assert_eq!(j["dns"]["nameservers"][0], "1.1.1.1");
        assert_eq!(j["custom"], "kept");
        assert_eq!(
            address_of(&j, "eth0"),
            Some("10.244.3.5/32".parse().unwrap())
        );
        assert_eq!(address_of(&j, "dummy0"), None, "dummy0 has no sandbox");
    }

    #[test]
    fn a_chained_address_naming_no_interface_does_not_take_sluices() {
        // Found by the fuzz target (proptest-regressions/fuzz_cni.txt): the chain's address
        // points at interface 0 of an empty list, where sluice's own interfaces go.
        let prev = json!({"cniVersion": "1.0.0", "interfaces": [],
                          "ips": [{"address": "192.0.2.7/24", "interface": 0}]});
        let j = sample().render(CniVersion::V1_0_0, Some(&prev), None);
        assert!(j["ips"][0].get("interface").is_none(), "{j}");
        assert_eq!(j["ips"][0]["address"], "192.0.2.7/24");
        assert_eq!(
            address_of(&j, "eth0"),
            Some("10.244.3.5/32".parse().unwrap())
        );
    }

    #[test]
    fn dns_from_config_when_no_chain() {
        let j = sample().render(
            CniVersion::V0_4_0,
            None,
            Some(&json!({"nameservers": ["10.96.0.10"]})),
        );
        assert_eq!(j["dns"]["nameservers"][0], "10.96.0.10");
    }

    fn interfaces() -> (Interface, Interface) {
        (
            Interface {
                name: "sl0123456789abc".into(),
                mac: "ee:ee:ee:ee:ee:ee".into(),
                sandbox: None,
                mtu: Some(1450),
            },
            Interface {
                name: "eth0".into(),
                mac: "02:11:22:33:44:55".into(),
                sandbox: Some("/run/netns/p".into()),
                mtu: Some(1450),
            },
        )
    }

    fn dual() -> AddResultAny {
        let (host, pod) = interfaces();
        pod_result(
            host,
            pod,
            Some(Ipv4Addr::new(10, 244, 3, 5)),
            Some("fd00:10:244:3::5".parse().unwrap()),
        )
    }

    #[test]
    fn a_dual_stack_result_carries_both_families_in_every_version() {
        let r = dual();
        for v in CniVersion::ALL {
            let j = r.render(v, None, None);
            assert_eq!(j["cniVersion"], v.as_str());
            let ips = j["ips"].as_array().unwrap();
            assert_eq!(ips.len(), 2, "{v}");
            assert_eq!(ips[0]["address"], "10.244.3.5/32");
            assert_eq!(ips[0]["gateway"], "169.254.1.1");
            assert_eq!(ips[1]["address"], "fd00:10:244:3::5/128");
            assert_eq!(ips[1]["gateway"], "fe80::ecee:eeff:feee:eeee");
            assert!(ips.iter().all(|ip| ip["interface"] == 1), "{v}");
            if v < CniVersion::V1_0_0 {
                assert_eq!(
                    (&ips[0]["version"], &ips[1]["version"]),
                    (&json!("4"), &json!("6")),
                    "{v}"
                );
            } else {
                assert!(ips.iter().all(|ip| ip.get("version").is_none()), "{v}");
            }
            assert_eq!(
                j["routes"],
                json!([
                    {"dst": "0.0.0.0/0", "gw": "169.254.1.1"},
                    {"dst": "::/0", "gw": "fe80::ecee:eeff:feee:eeee"}
                ]),
                "{v}"
            );
            assert_eq!(j["interfaces"][1]["sandbox"], "/run/netns/p");
            assert_eq!(
                j["interfaces"][1].get("mtu").is_some(),
                v >= CniVersion::V1_1_0,
                "{v}"
            );
            assert_eq!(
                address_of(&j, "eth0"),
                Some("10.244.3.5/32".parse().unwrap())
            );
            assert_eq!(
                address_of_v6(&j, "eth0"),
                Some("fd00:10:244:3::5/128".parse().unwrap())
            );
        }
    }

    #[test]
    fn an_ipv6_only_result_has_no_ipv4_address_or_route() {
        let (host, pod) = interfaces();
        let r = pod_result(host, pod, None, Some("fd00:10:244:3::5".parse().unwrap()));
        for v in CniVersion::ALL {
            let j = r.render(v, None, None);
            assert_eq!(j["ips"].as_array().unwrap().len(), 1, "{v}");
            assert_eq!(j["ips"][0]["address"], "fd00:10:244:3::5/128");
            if v < CniVersion::V1_0_0 {
                assert_eq!(j["ips"][0]["version"], "6", "{v}");
            }
            assert_eq!(
                j["routes"],
                json!([{"dst": "::/0", "gw": "fe80::ecee:eeff:feee:eeee"}]),
                "{v}"
            );
            assert_eq!(address_of(&j, "eth0"), None);
            assert!(address_of_v6(&j, "eth0").is_some());
        }
        // No address at all: the interfaces only (a node with no subnet never gets here).
        let (host, pod) = interfaces();
        let none = pod_result(host, pod, None, None);
        assert!(none.ips.is_empty() && none.routes.is_empty());
    }

    #[test]
    fn a_dual_result_chains_onto_a_previous_one() {
        let prev = json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "dummy0", "mac": "aa:aa:aa:aa:aa:aa", "sandbox": "/run/netns/p"}],
            "ips": [{"version": "6", "address": "fd99::9/64", "interface": 0}],
            "routes": [{"dst": "::/0", "gw": "fd99::1"}]
        });
        let j = dual().render(CniVersion::V0_4_0, Some(&prev), None);
        let ips = j["ips"].as_array().unwrap();
        assert_eq!(ips.len(), 3);
        assert_eq!(
            (&ips[1]["interface"], &ips[2]["interface"]),
            (&json!(2), &json!(2))
        );
        // The chain's IPv6 default route stays, sluice's IPv4 one is added.
        assert_eq!(
            j["routes"],
            json!([{"dst": "::/0", "gw": "fd99::1"}, {"dst": "0.0.0.0/0", "gw": "169.254.1.1"}])
        );
        assert_eq!(
            address_of_v6(&j, "dummy0"),
            Some("fd99::9/64".parse().unwrap())
        );
        assert_eq!(
            address_of_v6(&j, "eth0"),
            Some("fd00:10:244:3::5/128".parse().unwrap())
        );
    }
}
