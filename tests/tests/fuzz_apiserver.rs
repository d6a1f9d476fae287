//! Standing fuzz targets of the lab API server's label and field selectors and strategic merge
//! patches, through its HTTP edge (the parsers are private to the crate): any selector string is
//! a list or a 400 Status, never a 5xx; well-formed label selectors select exactly what
//! Kubernetes' rules say (an oracle written here from the rules, not from the server's code);
//! any patch is an object or a 4xx Status, and a map patch merges as the rules say (null
//! deletes). 128 cases a property (`PROPTEST_CASES` for more); failures' seeds in
//! `tests/proptest-regressions/fuzz_apiserver.txt`. Loopback only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use serde_json::{json, Map, Value};
use sluice_e2e::bench::http;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::OnceLock;

fn config() -> Config {
    Config {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/fuzz_apiserver.txt",
        ))),
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(128),
        max_shrink_time: 20_000,
        ..Config::default()
    }
}

/// One embedded API server for this test process, on loopback.
fn api() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let api = sluice_apiserver::ApiServer::open(sluice_apiserver::Options::default())
                    .unwrap();
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                api.serve(listener).await.unwrap();
            });
        });
        rx.recv().unwrap()
    })
}

/// The decoded body of an HTTP/1.1 answer (plain or chunked).
fn body_of(raw: &str) -> String {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_string();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

fn request(method: &str, path: &str, ctype: &str, body: &str) -> (u16, Value) {
    let (code, raw) = http(api(), method, path, ctype, body);
    let text = body_of(&raw);
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{method} {path}: answer {code} is not JSON ({e}): {raw}"));
    (code, json)
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A 4xx answer is a Kubernetes Status that says so.
fn is_status(code: u16, body: &Value) -> bool {
    body["kind"] == "Status" && body["code"].as_u64() == Some(u64::from(code))
}

/// A fresh namespace for one case, so that cases never see each other's objects.
fn namespace() -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let name = format!(
        "fuzz-{}",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let (code, body) = request(
        "POST",
        "/api/v1/namespaces",
        "application/json",
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}).to_string(),
    );
    assert_eq!(code, 201, "{body}");
    name
}

fn configmap(
    ns: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
    data: &BTreeMap<String, String>,
) {
    let (code, body) = request(
        "POST",
        &format!("/api/v1/namespaces/{ns}/configmaps"),
        "application/json",
        &json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name, "labels": labels}, "data": data})
        .to_string(),
    );
    assert_eq!(code, 201, "{body}");
}

fn names(list: &Value) -> Vec<String> {
    let mut v: Vec<String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

#[derive(Debug, Clone)]
enum Req {
    Eq(&'static str, &'static str, bool),
    NotEq(&'static str, &'static str),
    In(&'static str, Vec<&'static str>),
    NotIn(&'static str, Vec<&'static str>),
    Exists(&'static str),
    NotExists(&'static str),
}

impl Req {
    fn text(&self) -> String {
        match self {
            Req::Eq(k, v, double) => format!("{k}{}{v}", if *double { "==" } else { "=" }),
            Req::NotEq(k, v) => format!("{k}!={v}"),
            Req::In(k, vs) => format!("{k} in ({})", vs.join(",")),
            Req::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
            Req::Exists(k) => k.to_string(),
            Req::NotExists(k) => format!("!{k}"),
        }
    }

    /// Kubernetes' rule: `!=` and `notin` also match objects without the key.
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let get = |k: &str| labels.get(k).map(String::as_str);
        match self {
            Req::Eq(k, v, _) => get(k) == Some(*v),
            Req::NotEq(k, v) => get(k) != Some(*v),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.contains(&x)),
            Req::NotIn(k, vs) => get(k).is_none_or(|x| !vs.contains(&x)),
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
        }
    }
}

const KEYS: [&str; 4] = ["app", "tier", "sluice.dev/role", "a"];
const VALUES: [&str; 3] = ["web", "db", "x-1"];

fn requirement() -> impl Strategy<Value = Req> {
    let k = prop::sample::select(KEYS.to_vec());
    let v = prop::sample::select(VALUES.to_vec());
    let set = prop::sample::subsequence(VALUES.to_vec(), 1..=3);
    prop_oneof![
        (k.clone(), v.clone(), any::<bool>()).prop_map(|(k, v, d)| Req::Eq(k, v, d)),
        (k.clone(), v).prop_map(|(k, v)| Req::NotEq(k, v)),
        (k.clone(), set.clone()).prop_map(|(k, s)| Req::In(k, s)),
        (k.clone(), set).prop_map(|(k, s)| Req::NotIn(k, s)),
        k.clone().prop_map(Req::Exists),
        k.prop_map(Req::NotExists),
    ]
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        prop::sample::select(KEYS.to_vec()).prop_map(String::from),
        prop::sample::select(vec!["web", "db", "x-1", ""]).prop_map(String::from),
        0..4,
    )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_selector_string_is_a_list_or_a_400(
        label in prop_oneof![".{0,24}", "[a-z!=(),. /]{0,24}", "[a-z]{1,4}( (in|notin) )?\\(?[a-z,]{0,8}\\)?"],
        field in prop_oneof![".{0,24}", "(metadata\\.(name|namespace)|spec\\.x|status\\.phase)(=|==|!=)[a-z0-9\\\\,=]{0,8}"],
        which in any::<bool>(),
    ) {
        let (param, value) = if which { ("labelSelector", label) } else { ("fieldSelector", field) };
        let (code, body) = request("GET", &format!("/api/v1/configmaps?{param}={}", encode(&value)), "application/json", "");
        prop_assert!(code == 200 || (code == 400 && is_status(code, &body)), "{param}={value:?}: {code} {body}");
        if code == 200 {
            prop_assert!(body["items"].is_array(), "{body}");
        }
    }

    #[test]
    fn label_selectors_select_what_the_rules_say(
        objects in prop::collection::vec(labels(), 1..6),
        reqs in prop::collection::vec(requirement(), 0..4),
    ) {
        let ns = namespace();
        for (i, l) in objects.iter().enumerate() {
            configmap(&ns, &format!("cm{i}"), l, &BTreeMap::new());
        }
        let selector: Vec<String> = reqs.iter().map(Req::text).collect();
        let selector = selector.join(",");
        let (code, body) = request("GET", &format!("/api/v1/namespaces/{ns}/configmaps?labelSelector={}", encode(&selector)), "application/json", "");
        prop_assert_eq!(code, 200, "{:?}: {}", selector, body);
        let mut want: Vec<String> = objects
            .iter()
            .enumerate()
            .filter(|(_, l)| reqs.iter().all(|r| r.matches(l)))
            .map(|(i, _)| format!("cm{i}"))
            .collect();
        want.sort();
        prop_assert_eq!(names(&body), want, "{:?}", selector);
        // The same objects by name through a field selector.
        let (code, body) = request("GET", &format!("/api/v1/namespaces/{ns}/configmaps?fieldSelector={}", encode("metadata.name=cm0")), "application/json", "");
        prop_assert_eq!(code, 200);
        prop_assert_eq!(names(&body), vec!["cm0".to_string()]);
    }
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i32>().prop_map(Value::from),
        "[a-z$]{0,6}".prop_map(Value::from),
    ];
    let key = prop::sample::select(vec![
        "data",
        "metadata",
        "labels",
        "name",
        "$patch",
        "$retainKeys",
        "$setElementOrder/data",
        "kind",
        "apiVersion",
        "a",
        "b",
        "containers",
        "image",
    ]);
    leaf.prop_recursive(3, 24, 4, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            prop::collection::btree_map(key.clone().prop_map(String::from), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A patch of a ConfigMap's data and labels: a value sets, null deletes.
fn map_patch() -> impl Strategy<Value = BTreeMap<String, Option<String>>> {
    prop::collection::btree_map(
        prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from),
        prop::option::of("[a-z0-9]{0,6}"),
        0..4,
    )
}

fn merged(
    old: &BTreeMap<String, String>,
    patch: &BTreeMap<String, Option<String>>,
) -> BTreeMap<String, String> {
    let mut out = old.clone();
    for (k, v) in patch {
        match v {
            Some(v) => {
                out.insert(k.clone(), v.clone());
            }
            None => {
                out.remove(k);
            }
        }
    }
    out
}

fn as_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

const SMP: &str = "application/strategic-merge-patch+json";

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_strategic_merge_patch_is_an_object_or_a_4xx(patch in any_json()) {
        let ns = namespace();
        let data: BTreeMap<String, String> = [("a".to_string(), "1".to_string())].into();
        configmap(&ns, "cm", &BTreeMap::new(), &data);
        let path = format!("/api/v1/namespaces/{ns}/configmaps/cm");
        let (code, body) = request("PATCH", &path, SMP, &patch.to_string());
        prop_assert!(code == 200 || ((400..500).contains(&code) && is_status(code, &body)), "{patch}: {code} {body}");
        let (get_code, stored) = request("GET", &path, "application/json", "");
        prop_assert_eq!(get_code, 200);
        if code == 200 {
            // What the server answered is what it stored, under the same name.
            prop_assert_eq!(&stored, &body);
            prop_assert_eq!(&stored["metadata"]["name"], &json!("cm"));
        } else {
            prop_assert_eq!(as_map(&stored["data"]), data, "a refused patch changed the object");
        }
    }

    #[test]
    fn a_map_patch_merges_as_the_rules_say(
        data in prop::collection::btree_map(prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from), "[a-z0-9]{0,6}", 0..3),
        labels in prop::collection::btree_map(prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from), "[a-z0-9]{1,6}", 0..3),
        data_patch in map_patch(),
        label_patch in map_patch(),
    ) {
        // A label value must be a valid label value: no empty strings to keep the oracle simple.
        let label_patch: BTreeMap<String, Option<String>> = label_patch
            .into_iter()
            .map(|(k, v)| (k, v.map(|s| if s.is_empty() { "v".into() } else { s })))
            .collect();
        let ns = namespace();
        configmap(&ns, "cm", &labels, &data);
        let to_json = |p: &BTreeMap<String, Option<String>>| -> Value {
            Value::Object(p.iter().map(|(k, v)| (k.clone(), v.clone().map_or(Value::Null, Value::from))).collect::<Map<_, _>>())
        };
        let patch = json!({"data": to_json(&data_patch), "metadata": {"labels": to_json(&label_patch)}});
        let path = format!("/api/v1/namespaces/{ns}/configmaps/cm");
        let (code, body) = request("PATCH", &path, SMP, &patch.to_string());
        prop_assert_eq!(code, 200, "{}: {}", patch, body);
        prop_assert_eq!(as_map(&body["data"]), merged(&data, &data_patch), "{}", patch);
        prop_assert_eq!(as_map(&body["metadata"]["labels"]), merged(&labels, &label_patch), "{}", patch);
    }
}
