//! The standing fuzz targets of what sluice-cni parses from outside: the network configuration on
//! stdin (raw bytes and config-shaped JSON), the `CNI_*` environment, and the results it shapes per
//! version and chains onto a `prevResult`. Property tests (proptest), run in the default test run:
//! 1024 cases a property (`PROPTEST_CASES=100000 cargo test -p sluice-net --test fuzz_cni` for a
//! longer hunt). A failure's seed is written to `proptest-regressions/fuzz_cni.txt`, kept in
//! the repository, and replayed first on every run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, FileFailurePersistence};
use serde_json::{json, Map, Value};
use sluice_net::cni::config::{peek_version, Attachment, NetConf, Request};
use sluice_net::cni::result::{self, AddResultAny, Interface, IpConfigAny, RouteAny};
use sluice_net::cni::{CniError, CniVersion, Command, ErrorCode};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// 1024 cases a property (a second or two in all), or `PROPTEST_CASES`.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

fn config() -> Config {
    Config {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/fuzz_cni.txt",
        ))),
        // Bounded in time as in cases: a failure shrinks for at most 20 s.
        cases: cases(),
        max_shrink_time: 20_000,
        ..Config::default()
    }
}

/// The codes a configuration or environment error may carry: the spec's, none of sluice's own.
fn is_input_error(e: &CniError) -> bool {
    matches!(
        e.code,
        ErrorCode::IncompatibleVersion
            | ErrorCode::UnsupportedField
            | ErrorCode::InvalidEnvironment
            | ErrorCode::Decoding
            | ErrorCode::InvalidConfig
    ) && !e.msg.is_empty()
}

/// An error's JSON is the spec's error object.
fn well_formed(e: &CniError, version: Option<&str>) -> bool {
    let j = e.to_json(version);
    j["code"].as_u64() == Some(e.code as u64)
        && j["msg"].as_str().is_some_and(|m| !m.is_empty())
        && j["cniVersion"].as_str().is_some()
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn version_text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec!["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]).prop_map(String::from),
        1 => prop::sample::select(vec!["0.1.0", "0.2.0", "1.2.0", "2.0.0", "", "1.1", "v1.0.0"])
            .prop_map(String::from),
        1 => ".{0,8}",
    ]
}

fn attachment_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        ("[a-z0-9]{1,12}", "eth[0-9]").prop_map(|(c, i)| json!({"containerID": c, "ifname": i})),
        any_json(),
    ]
}

/// Objects with the keys sluice reads, each either of the right type or anything at all.
fn config_object() -> impl Strategy<Value = Value> {
    // Each key is there most of the time, and most of the time of the right type.
    let field = |key: &'static str, good: BoxedStrategy<Value>| {
        (
            Just(key),
            prop_oneof![8 => good, 1 => any_json()],
            prop::bool::weighted(0.8),
        )
    };
    (
        field("cniVersion", version_text().prop_map(Value::from).boxed()),
        field("name", "[a-z][a-z0-9-]{0,10}".prop_map(Value::from).boxed()),
        field("type", Just(json!("sluice-cni")).boxed()),
        field("mtu", (0u32..70_000).prop_map(Value::from).boxed()),
        field("subnetFile", "/[a-z/]{0,20}".prop_map(Value::from).boxed()),
        field(
            "ipam",
            prop_oneof![Just(json!({})), Just(json!({"type": "host-local"}))].boxed(),
        ),
        field(
            "cni.dev/valid-attachments",
            prop::collection::vec(attachment_json(), 0..4)
                .prop_map(Value::from)
                .boxed(),
        ),
        field(
            "cni.dev/attachments",
            prop::collection::vec(attachment_json(), 0..4)
                .prop_map(Value::from)
                .boxed(),
        ),
        field("prevResult", any_json().boxed()),
        field("dns", any_json().boxed()),
    )
        .prop_map(|fields| {
            let fields = [
                fields.0, fields.1, fields.2, fields.3, fields.4, fields.5, fields.6, fields.7,
                fields.8, fields.9,
            ];
            Value::Object(
                fields
                    .into_iter()
                    .filter(|(_, _, present)| *present)
                    .map(|(k, v, _)| (k.to_string(), v))
                    .collect(),
            )
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_bytes_on_stdin_give_a_config_or_a_spec_error(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = peek_version(&bytes);
        if let Err(e) = NetConf::parse(&bytes) {
            prop_assert!(is_input_error(&e), "{e}");
            prop_assert!(well_formed(&e, None));
        }
    }

    #[test]
    fn config_shaped_json_parses_to_what_it_says(obj in config_object()) {
        let text = obj.to_string();
        prop_assert_eq!(peek_version(text.as_bytes()), obj["cniVersion"].as_str().map(String::from));
        match NetConf::parse(text.as_bytes()) {
            Ok(conf) => {
                prop_assert_eq!(Some(conf.version), obj["cniVersion"].as_str().and_then(CniVersion::parse));
                prop_assert_eq!(Some(conf.name.as_str()), obj["name"].as_str());
                prop_assert!(conf.mtu.is_none_or(|m| (576..=65535).contains(&m)));
                // GC's list: given under either key it is that list; absent under both, an error.
                let list = |key: &str| obj.get(key).map(|v| serde_json::from_value::<Option<Vec<Attachment>>>(v.clone()).unwrap().unwrap_or_default());
                match (list("cni.dev/valid-attachments"), list("cni.dev/attachments"), conf.gc_attachments()) {
                    (None, None, Err(e)) => prop_assert_eq!(e.code, ErrorCode::InvalidConfig),
                    (Some(a), None, Ok(got)) | (None, Some(a), Ok(got)) => prop_assert_eq!(got, a),
                    (Some(_), Some(_), Ok(_) | Err(_)) => {}
                    (a, b, got) => prop_assert!(false, "{a:?} {b:?} gave {got:?}"),
                }
            }
            Err(e) => {
                prop_assert!(is_input_error(&e), "{e}");
                prop_assert!(well_formed(&e, obj["cniVersion"].as_str()));
            }
        }
    }

    #[test]
    fn any_environment_gives_a_request_or_an_environment_error(
        command in prop::sample::select(vec![Command::Add, Command::Del, Command::Check, Command::Status, Command::Gc]),
        vars in prop::collection::btree_map(
            prop::sample::select(vec!["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"]),
            prop_oneof![".{0,20}", "[a-z0-9]{1,16}", "eth[0-9]", "(/run/netns/[a-z]{1,6})?", "([A-Z_]{1,8}=[a-z0-9/]{0,6};){0,3}"],
            0..5,
        ),
    ) {
        match Request::from_env(command, |k| vars.get(k).cloned()) {
            Ok(req) => {
                if matches!(command, Command::Add | Command::Check | Command::Del) {
                    prop_assert_eq!(Some(&req.container_id), vars.get("CNI_CONTAINERID"));
                    prop_assert!(!req.container_id.contains('/') && !req.container_id.starts_with('.'));
                    prop_assert!(req.ifname.len() <= 15 && !req.ifname.contains('/'));
                    prop_assert!(command == Command::Del || req.netns.is_some());
                }
            }
            Err(e) => {
                prop_assert_eq!(e.code, ErrorCode::InvalidEnvironment, "{}", e);
                prop_assert!(well_formed(&e, None));
            }
        }
    }

    #[test]
    fn cni_args_round_trip(args in prop::collection::btree_map("[A-Za-z_][A-Za-z0-9_]{0,12}", "[^;=]{0,16}", 0..5)) {
        let text: String = args.iter().map(|(k, v)| format!("{k}={v};")).collect();
        let req = Request::from_env(Command::Status, |k| (k == "CNI_ARGS").then(|| text.clone())).unwrap();
        prop_assert_eq!(req.args, args);
    }
}

fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>().prop_map(Ipv4Addr::from)
}

/// A prefix of either family.
fn ip_net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (ipv4(), 0u8..=32).prop_map(|(a, len)| IpNet::V4(Ipv4Net::new(a, len).unwrap())),
        (any::<u128>(), 0u8..=128)
            .prop_map(|(a, len)| IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), len).unwrap())),
    ]
}

fn ip_addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        ipv4().prop_map(IpAddr::V4),
        any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a)))
    ]
}

fn add_result() -> impl Strategy<Value = AddResultAny> {
    let interface = (
        "[a-z]{1,6}[0-9]?",
        prop::option::of("/run/netns/[a-z]{1,6}"),
        prop::option::of(576u32..9001),
    )
        .prop_map(|(name, sandbox, mtu)| Interface {
            name,
            mac: "ee:ee:ee:ee:ee:ee".into(),
            sandbox,
            mtu,
        });
    (
        prop::collection::vec(interface, 1..4),
        prop::collection::vec(
            (
                ip_net(),
                prop::option::of(ip_addr()),
                any::<prop::sample::Index>(),
            ),
            0..4,
        ),
        prop::collection::vec((ip_net(), prop::option::of(ip_addr())), 0..4),
    )
        .prop_map(|(interfaces, ips, routes)| {
            let n = interfaces.len();
            AddResultAny {
                ips: ips
                    .into_iter()
                    .map(|(address, gateway, i)| IpConfigAny {
                        address,
                        gateway,
                        interface: Some(i.index(n)),
                    })
                    .collect(),
                routes: routes
                    .into_iter()
                    .map(|(dst, gw)| RouteAny {
                        dst: dst.trunc(),
                        gw,
                    })
                    .collect(),
                interfaces,
            }
        })
}

fn prev_result() -> impl Strategy<Value = Option<Value>> {
    prop::option::of(prop_oneof![
        any_json(),
        (prop::collection::vec("[a-z]{1,6}", 0..3), any_json()).prop_map(|(names, extra)| {
            let interfaces: Vec<Value> = names.iter().map(|n| json!({"name": format!("p{n}"), "mac": "aa:aa:aa:aa:aa:aa"})).collect();
            json!({"cniVersion": "1.0.0", "interfaces": interfaces, "ips": [{"address": "192.0.2.7/24", "interface": 0}],
                   "routes": [{"dst": "0.0.0.0/0", "gw": "192.0.2.1"}], "extra": extra})
        }),
    ])
}

fn array(v: &Value, key: &str) -> Vec<Value> {
    v.get(key)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn results_are_shaped_for_their_version(
        r in add_result(),
        version in prop::sample::select(CniVersion::ALL.to_vec()),
        prev in prev_result(),
        dns in prop::option::of(any_json()),
    ) {
        let out = r.render(version, prev.as_ref(), dns.as_ref());
        prop_assert_eq!(out["cniVersion"].as_str(), Some(version.as_str()));
        let prev_obj: Map<String, Value> = prev.as_ref().and_then(|p| p.as_object().cloned()).unwrap_or_default();
        let prev_value = Value::Object(prev_obj.clone());
        let (prev_ifs, prev_ips) = (array(&prev_value, "interfaces").len(), array(&prev_value, "ips").len());
        let interfaces = array(&out, "interfaces");
        let ips = array(&out, "ips");
        // Sluice's entries come after the chain's, which are kept as they were.
        prop_assert_eq!(interfaces.len(), prev_ifs + r.interfaces.len());
        prop_assert_eq!(ips.len(), prev_ips + r.ips.len());
        prop_assert_eq!(&interfaces[..prev_ifs], &array(&prev_value, "interfaces")[..]);
        for (mine, ip) in r.ips.iter().zip(&ips[prev_ips..]) {
            let address = mine.address.to_string();
            prop_assert_eq!(ip["address"].as_str(), Some(address.as_str()));
            prop_assert_eq!(ip.get("version").is_some(), version < CniVersion::V1_0_0);
            let index = ip["interface"].as_u64().unwrap() as usize;
            prop_assert!(index < interfaces.len());
            prop_assert_eq!(&interfaces[index]["name"], &json!(r.interfaces[mine.interface.unwrap()].name));
        }
        for (mine, i) in r.interfaces.iter().zip(&interfaces[prev_ifs..]) {
            prop_assert_eq!(i.get("mtu").is_some(), version >= CniVersion::V1_1_0 && mine.mtu.is_some());
            prop_assert_eq!(i.get("sandbox").and_then(Value::as_str), mine.sandbox.as_deref());
        }
        // No destination is routed twice; every route sluice adds is there.
        let routes = array(&out, "routes");
        let mut dsts: Vec<&str> = routes.iter().filter_map(|r| r["dst"].as_str()).collect();
        for mine in &r.routes {
            prop_assert!(dsts.contains(&mine.dst.to_string().as_str()));
        }
        let prev_dsts: Vec<String> = array(&prev_value, "routes").iter().filter_map(|r| r["dst"].as_str().map(String::from)).collect();
        dsts.retain(|d| !prev_dsts.iter().any(|p| p == d));
        let unique: std::collections::BTreeSet<&&str> = dsts.iter().collect();
        prop_assert_eq!(unique.len(), dsts.len());
        // Whatever else the chain carried is kept, and there is always a dns object.
        for (k, v) in &prev_obj {
            if !["cniVersion", "interfaces", "ips", "routes", "dns"].contains(&k.as_str()) {
                prop_assert_eq!(&out[k], v);
            }
        }
        prop_assert!(out.get("dns").is_some());
        // CHECK reads back the address of each family of a sandbox interface from the result
        // it is handed.
        for mine in &r.ips {
            let iface = &r.interfaces[mine.interface.unwrap()];
            let same_family = |ip: &&IpConfigAny| ip.address.addr().is_ipv4() == mine.address.addr().is_ipv4();
            let first_of_family = r.ips.iter().filter(same_family).find(|ip| ip.interface == mine.interface);
            let unique_name = r.interfaces.iter().filter(|i| i.name == iface.name).count() == 1
                && !array(&prev_value, "interfaces").iter().any(|i| i["name"] == json!(iface.name));
            if iface.sandbox.is_some() && unique_name && first_of_family == Some(mine) {
                match mine.address {
                    IpNet::V4(a) => prop_assert_eq!(result::address_of(&out, &iface.name), Some(a)),
                    IpNet::V6(a) => prop_assert_eq!(result::address_of_v6(&out, &iface.name), Some(a)),
                }
            }
        }
    }
}

#[test]
fn the_fuzz_targets_reach_both_outcomes() {
    // The strategies are not so narrow that every case fails early, nor so tame that none does.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut ok, mut err) = (0, 0);
    for _ in 0..500 {
        let obj = config_object().new_tree(&mut runner).unwrap().current();
        match NetConf::parse(obj.to_string().as_bytes()) {
            Ok(_) => ok += 1,
            Err(_) => err += 1,
        }
    }
    assert!(ok > 25 && err > 25, "ok {ok}, err {err}");
}
