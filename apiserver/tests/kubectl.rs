//! kubectl (v1.32) against the server, through the kubeconfig the harness wrote.
//!
//! Skipped with a message when kubectl is missing, unless `CI` is set (then it fails).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{e2e_has_controllers, is_e2e, unique, Harness, TEST_LABEL};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// Bound on one kubectl invocation.
const RUN: Duration = Duration::from_secs(30);

fn kubectl_path() -> Option<PathBuf> {
    let candidates = [PathBuf::from("/usr/bin/kubectl")];
    let found = candidates.into_iter().find(|p| p.exists()).or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("kubectl"))
                .find(|p| p.exists())
        })
    });
    if found.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("kubectl not found (and CI is set, so this is a failure, not a skip)");
        }
        eprintln!("SKIPPED: kubectl not found in /usr/bin or on PATH");
    }
    found
}

struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
    cache: tempfile::TempDir,
}

struct Out {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Kubectl {
    fn new(h: &Harness) -> Option<Kubectl> {
        Some(Kubectl {
            bin: kubectl_path()?,
            kubeconfig: h.kubeconfig.clone(),
            cache: tempfile::tempdir().unwrap(),
        })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.cache.path())
            .arg("--request-timeout=20s")
            .args(args)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }

    /// Runs kubectl (killed if it outlives [`RUN`] or the test).
    async fn run(&self, args: &[&str]) -> Out {
        let out = common::bounded_for(RUN, self.command(args).output())
            .await
            .unwrap_or_else(|e| panic!("spawn kubectl {args:?}: {e}"));
        Out {
            ok: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs kubectl, failing the test unless it exits 0; returns stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args).await;
        assert!(
            o.ok,
            "kubectl {} failed\nstdout: {}\nstderr: {}",
            args.join(" "),
            o.stdout,
            o.stderr
        );
        o.stdout
    }

    /// Runs kubectl, failing the test if it exits 0; returns stderr.
    async fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args).await;
        assert!(
            !o.ok,
            "kubectl {} should fail\nstdout: {}\nstderr: {}",
            args.join(" "),
            o.stdout,
            o.stderr
        );
        o.stderr
    }

    async fn get_json(&self, args: &[&str]) -> Value {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        let out = self.ok(&a).await;
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("kubectl get -o json: {e}: {out}"))
    }

    /// Starts a long-running kubectl whose stdout lines arrive on the returned channel.
    fn spawn_lines(&self, args: &[&str]) -> Spawned {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn kubectl {args:?}: {e}"));
        let (tx, rx) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        let readers = vec![
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    if tx.send(l).is_err() {
                        break;
                    }
                }
            }),
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    if tx2.send(format!("stderr: {l}")).is_err() {
                        break;
                    }
                }
            }),
        ];
        Spawned {
            child,
            rx,
            readers,
            seen: Vec::new(),
        }
    }
}

/// A running kubectl; killed (and its readers stopped) on every exit path.
struct Spawned {
    child: Child,
    rx: mpsc::UnboundedReceiver<String>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    seen: Vec<String>,
}

impl Spawned {
    /// Waits (bounded) for a line on which `pred` holds.
    async fn wait_line(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(l)) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return l;
                    }
                }
                Ok(None) => panic!("kubectl ended before {what}; output: {:#?}", self.seen),
                Err(_) => panic!("no {what} within 15 s; output so far: {:#?}", self.seen),
            }
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        for r in &self.readers {
            r.abort();
        }
    }
}

fn write(dir: &Path, file: &str, text: &str) -> String {
    let p = dir.join(file);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

fn labels_yaml(extra: &str) -> String {
    format!("  labels:\n    {TEST_LABEL}: \"true\"\n{extra}")
}

/// One kind's round trip: apply (created, unchanged, configured), get -o json / -o yaml,
/// label (add, refuse without --overwrite, overwrite, remove), get -w, delete.
struct Kind<'a> {
    /// kubectl's resource name, e.g. `configmap`.
    resource: &'a str,
    /// What `kubectl apply` prints before the slash, e.g. `configmap`,
    /// `networkpolicy.networking.k8s.io`.
    printed: &'a str,
    name: String,
    namespace: Option<String>,
    v1: String,
    v2: String,
    /// A JSON pointer and the value the v2 manifest gives it.
    v2_check: (&'a str, Value),
    /// The columns of `kubectl get` (kube-apiserver's table for the kind).
    columns: &'a [&'a str],
}

async fn lifecycle(h: &Harness, k: Kind<'_>) {
    let Some(kc) = Kubectl::new(h) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ns_args: Vec<&str> = match &k.namespace {
        Some(ns) => vec!["-n", ns.as_str()],
        None => vec![],
    };
    let with_ns = |args: &[&str]| -> Vec<String> {
        args.iter()
            .chain(ns_args.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let run_ok = |args: Vec<String>| {
        let kc = &kc;
        async move {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            kc.ok(&a).await
        }
    };
    let printed = format!("{}/{}", k.printed, k.name);

    // apply: created, unchanged, configured.
    let f1 = write(dir.path(), "v1.yaml", &k.v1);
    let out = run_ok(with_ns(&["apply", "-f", &f1])).await;
    assert!(
        out.contains(&format!("{printed} created")),
        "apply v1: {out}"
    );
    let out = run_ok(with_ns(&["apply", "-f", &f1])).await;
    assert!(
        out.contains(&format!("{printed} unchanged")),
        "apply v1 again: {out}"
    );
    let f2 = write(dir.path(), "v2.yaml", &k.v2);
    let out = run_ok(with_ns(&["apply", "-f", &f2])).await;
    assert!(
        out.contains(&format!("{printed} configured")),
        "apply v2: {out}"
    );

    // kubectl diff: 0 = nothing to change, 1 = differences.
    let a = with_ns(&["diff", "-f", &f2]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let d = kc.run(&a).await;
    assert_eq!(
        d.code,
        Some(0),
        "kubectl diff of the applied file: {} {}",
        d.stdout,
        d.stderr
    );
    let a = with_ns(&["diff", "-f", &f1]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let d = kc.run(&a).await;
    assert_eq!(
        d.code,
        Some(1),
        "kubectl diff of the older file: {} {}",
        d.stdout,
        d.stderr
    );

    // get -o json / -o yaml.
    let get_json = |extra: &[&str]| {
        let mut a = vec!["get".to_string(), k.resource.to_string(), k.name.clone()];
        a.extend(ns_args.iter().map(|s| s.to_string()));
        a.extend(extra.iter().map(|s| s.to_string()));
        a.extend(["-o".to_string(), "json".to_string()]);
        let kc = &kc;
        async move {
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            let out = kc.ok(&a).await;
            serde_json::from_str::<Value>(&out)
                .unwrap_or_else(|e| panic!("kubectl get -o json: {e}: {out}"))
        }
    };
    let obj = get_json(&[]).await;
    assert_eq!(obj["metadata"]["name"], k.name.as_str());
    let (ptr, want) = &k.v2_check;
    assert_eq!(obj.pointer(ptr), Some(want), "{ptr} after apply v2: {obj}");
    assert_eq!(obj["metadata"]["labels"]["edit"], "2", "{obj}");
    assert!(
        obj["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .is_string(),
        "client-side apply keeps its annotation: {obj}"
    );
    let yaml = run_ok(with_ns(&["get", k.resource, &k.name, "-o", "yaml"])).await;
    assert!(yaml.contains(&format!("name: {}", k.name)), "{yaml}");
    // The default (table) output names it too.
    let table = run_ok(with_ns(&["get", k.resource, &k.name])).await;
    assert!(table.contains(&k.name), "{table}");
    // kube-apiserver's server-side table columns for the kind.
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        header, k.columns,
        "kubectl get {} table header: {table}",
        k.resource
    );

    // label: add, refuse to overwrite without --overwrite, overwrite, remove.
    let out = run_ok(with_ns(&["label", k.resource, &k.name, "color=blue"])).await;
    assert!(out.contains("labeled"), "{out}");
    assert_eq!(get_json(&[]).await["metadata"]["labels"]["color"], "blue");
    let a = with_ns(&["label", k.resource, &k.name, "color=red"]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let err = kc.fails(&a).await;
    assert!(err.contains("already has a value"), "{err}");
    run_ok(with_ns(&[
        "label",
        "--overwrite",
        k.resource,
        &k.name,
        "color=red",
    ]))
    .await;
    assert_eq!(get_json(&[]).await["metadata"]["labels"]["color"], "red");
    let out = run_ok(with_ns(&["label", k.resource, &k.name, "color-"])).await;
    assert!(out.contains("unlabeled"), "{out}");
    let obj = get_json(&[]).await;
    assert!(obj["metadata"]["labels"].get("color").is_none(), "{obj}");
    assert_eq!(
        obj.pointer(ptr),
        Some(want),
        "labels must not disturb the rest: {obj}"
    );

    // get -w --output-watch-events: the existing object, then a change.
    {
        let a = with_ns(&["get", k.resource, &k.name, "-w", "--output-watch-events"]);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let mut w = kc.spawn_lines(&a);
        let name = k.name.clone();
        w.wait_line("the ADDED line", |l| {
            l.contains("ADDED") && l.contains(&name)
        })
        .await;
        run_ok(with_ns(&["label", k.resource, &k.name, "watched=yes"])).await;
        w.wait_line("the MODIFIED line", |l| {
            l.contains("MODIFIED") && l.contains(&name)
        })
        .await;
    }
    // And the JSON form of the watch.
    {
        let a = with_ns(&[
            "get",
            k.resource,
            &k.name,
            "-w",
            "--output-watch-events",
            "-o",
            "json",
        ]);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let mut w = kc.spawn_lines(&a);
        // kubectl prints each event as one JSON document (compact or indented).
        let event = |t: &'static str| {
            move |l: &str| l.replace(' ', "").contains(&format!("\"type\":\"{t}\""))
        };
        w.wait_line("an ADDED event", event("ADDED")).await;
        run_ok(with_ns(&[
            "label",
            k.resource,
            &k.name,
            "watched=again",
            "--overwrite",
        ]))
        .await;
        w.wait_line("a MODIFIED event", event("MODIFIED")).await;
    }

    // delete.
    let namespace_without_controller =
        k.resource == "namespace" && is_e2e() && !e2e_has_controllers();
    let mut del = with_ns(&["delete", k.resource, &k.name]);
    if namespace_without_controller {
        del.push("--wait=false".into());
    }
    let out = run_ok(del).await;
    // kubectl delete prints `KIND "NAME" deleted`.
    assert!(
        out.contains(&format!("{} \"{}\" deleted", k.printed, k.name)),
        "{out}"
    );
    if namespace_without_controller {
        eprintln!("SKIPPED the namespace-gone check: no namespace controller on the real server");
        return;
    }
    let a = with_ns(&["get", k.resource, &k.name]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let err = kc.fails(&a).await;
    assert!(
        err.contains("NotFound") && err.contains("not found"),
        "{err}"
    );
}

const IMAGE: &str = "registry.k8s.io/pause:3.9";
const IMAGE2: &str = "registry.k8s.io/pause:3.10";

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_namespace() {
    let h = Harness::start().await;
    let name = unique("kns");
    h.track_namespace(&name);
    let v1 = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n{}",
        labels_yaml("")
    );
    let v2 = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n{}",
        labels_yaml("    edit: \"2\"\n")
    );
    lifecycle(
        &h,
        Kind {
            resource: "namespace",
            printed: "namespace",
            columns: &["NAME", "STATUS", "AGE"],
            name,
            namespace: None,
            v1,
            v2,
            v2_check: ("/metadata/labels/edit", Value::from("2")),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_node() {
    let h = Harness::start().await;
    let name = unique("knode");
    h.track_node(&name);
    let v1 = format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n{}",
        labels_yaml("")
    );
    let v2 = format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n{}spec:\n  unschedulable: true\n",
        labels_yaml("    edit: \"2\"\n")
    );
    lifecycle(
        &h,
        Kind {
            resource: "node",
            printed: "node",
            columns: &["NAME", "STATUS", "ROLES", "AGE", "VERSION"],
            name,
            namespace: None,
            v1,
            v2,
            v2_check: ("/spec/unschedulable", Value::from(true)),
        },
    )
    .await;
}

fn pod_yaml(name: &str, image: &str, extra_labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n{}spec:\n  schedulerName: sluice-test-no-scheduler\n  terminationGracePeriodSeconds: 0\n  containers:\n  - name: c\n    image: {image}\n    ports:\n    - containerPort: 8080\n",
        labels_yaml(extra_labels)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_pod() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let name = unique("kpod");
    lifecycle(
        &h,
        Kind {
            resource: "pod",
            printed: "pod",
            columns: &["NAME", "READY", "STATUS", "RESTARTS", "AGE"],
            v1: pod_yaml(&name, IMAGE, ""),
            v2: pod_yaml(&name, IMAGE2, "    edit: \"2\"\n"),
            name,
            namespace: Some(ns),
            v2_check: ("/spec/containers/0/image", Value::from(IMAGE2)),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_configmap() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let name = unique("kcm");
    let y = |extra: &str, v: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n{}data:\n  k: {v}\n  other: \"1\"\n",
            labels_yaml(extra)
        )
    };
    lifecycle(
        &h,
        Kind {
            resource: "configmap",
            printed: "configmap",
            columns: &["NAME", "DATA", "AGE"],
            v1: y("", "v1"),
            v2: y("    edit: \"2\"\n", "v2"),
            name,
            namespace: Some(ns),
            v2_check: ("/data/k", Value::from("v2")),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_networkpolicy() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let name = unique("knp");
    let y = |extra: &str, app: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n{}spec:\n  podSelector:\n    matchLabels:\n      app: {app}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          role: client\n    ports:\n    - protocol: TCP\n      port: 80\n",
            labels_yaml(extra)
        )
    };
    lifecycle(
        &h,
        Kind {
            resource: "networkpolicy",
            printed: "networkpolicy.networking.k8s.io",
            columns: &["NAME", "POD-SELECTOR", "AGE"],
            v1: y("", "web"),
            v2: y("    edit: \"2\"\n", "db"),
            name,
            namespace: Some(ns),
            v2_check: ("/spec/podSelector/matchLabels/app", Value::from("db")),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_lease() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let name = unique("klease");
    let y = |extra: &str, holder: &str| {
        format!(
            "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: {name}\n{}spec:\n  holderIdentity: {holder}\n  leaseDurationSeconds: 40\n",
            labels_yaml(extra)
        )
    };
    lifecycle(
        &h,
        Kind {
            resource: "lease",
            printed: "lease.coordination.k8s.io",
            columns: &["NAME", "HOLDER", "AGE"],
            v1: y("", "n1"),
            v2: y("    edit: \"2\"\n", "n2"),
            name,
            namespace: Some(ns),
            v2_check: ("/spec/holderIdentity", Value::from("n2")),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_get_listings() {
    let h = Harness::start().await;
    let Some(kc) = Kubectl::new(&h) else {
        return;
    };
    let ns = h.namespace().await;
    let dir = tempfile::tempdir().unwrap();
    let pod = unique("lpod");
    let f = write(dir.path(), "pod.yaml", &pod_yaml(&pod, IMAGE, ""));
    kc.ok(&["apply", "-n", &ns, "-f", &f]).await;

    let out = kc.ok(&["get", "pods", "-A"]).await;
    assert!(out.starts_with("NAMESPACE"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with(ns.as_str()) && l.contains(&pod)),
        "get pods -A lacks {ns}/{pod}: {out}"
    );
    let out = kc.ok(&["get", "ns"]).await;
    for n in [ns.as_str(), "default", "kube-system"] {
        assert!(
            out.lines().any(|l| l.starts_with(&format!("{n} "))),
            "get ns lacks {n}: {out}"
        );
    }
    let list = kc.get_json(&["pods", "-n", &ns]).await;
    assert_eq!(list["kind"], "List", "kubectl prints a List: {list}");
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, [pod.as_str()]);
    // Label-selected listing through kubectl.
    let out = kc
        .ok(&[
            "get",
            "pods",
            "-n",
            &ns,
            "-l",
            &format!("{TEST_LABEL}=true"),
            "-o",
            "name",
        ])
        .await;
    assert_eq!(out.trim(), format!("pod/{pod}"));
    let out = kc
        .ok(&["get", "pods", "-n", &ns, "-l", "nope=1", "-o", "name"])
        .await;
    assert_eq!(out.trim(), "");
    // Each kind lists.
    for r in [
        "nodes",
        "configmaps",
        "networkpolicies",
        "leases",
        "namespaces",
    ] {
        let o = kc.run(&["get", r, "-n", &ns]).await;
        assert!(o.ok, "kubectl get {r}: {}", o.stderr);
    }
    // api-resources names the six kinds.
    let out = kc.ok(&["api-resources", "-o", "name"]).await;
    for r in [
        "nodes",
        "pods",
        "namespaces",
        "configmaps",
        "networkpolicies.networking.k8s.io",
        "leases.coordination.k8s.io",
    ] {
        assert!(
            out.lines().any(|l| l == r),
            "api-resources lacks {r}: {out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_server_side_apply() {
    let h = Harness::start().await;
    let Some(kc) = Kubectl::new(&h) else {
        return;
    };
    let ns = h.namespace().await;
    let dir = tempfile::tempdir().unwrap();
    let name = unique("ssa");
    let y = |a: &str, b: Option<&str>| {
        let mut s = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n{}data:\n  a: \"{a}\"\n",
            labels_yaml("")
        );
        if let Some(b) = b {
            s.push_str(&format!("  b: \"{b}\"\n"));
        }
        s
    };
    let f = write(dir.path(), "1.yaml", &y("1", Some("2")));
    let out = kc
        .ok(&["apply", "--server-side", "-n", &ns, "-f", &f])
        .await;
    assert!(
        out.contains(&format!("configmap/{name} serverside-applied")),
        "{out}"
    );
    let obj = kc
        .get_json(&["configmap", &name, "-n", &ns, "--show-managed-fields"])
        .await;
    assert_eq!(obj["data"], serde_json::json!({"a": "1", "b": "2"}));
    let mf = obj["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        mf.iter()
            .any(|m| m["manager"] == "kubectl" && m["operation"] == "Apply"),
        "managedFields: {mf:?}"
    );
    let rv = obj["metadata"]["resourceVersion"].clone();

    // kubectl diff --server-side (a dry-run apply): 0 = no difference, 1 = differences.
    let d = kc
        .run(&["diff", "--server-side", "-n", &ns, "-f", &f])
        .await;
    assert_eq!(
        d.code,
        Some(0),
        "kubectl diff of the applied file: {} {}",
        d.stdout,
        d.stderr
    );
    let changed = write(dir.path(), "1b.yaml", &y("1", Some("changed")));
    let d = kc
        .run(&["diff", "--server-side", "-n", &ns, "-f", &changed])
        .await;
    assert_eq!(
        d.code,
        Some(1),
        "kubectl diff of a changed file: {} {}",
        d.stdout,
        d.stderr
    );
    assert!(d.stdout.contains("changed"), "{}", d.stdout);
    let obj = kc.get_json(&["configmap", &name, "-n", &ns]).await;
    assert_eq!(obj["data"]["b"], "2", "diff must not write");

    // Unchanged re-apply: no write.
    kc.ok(&["apply", "--server-side", "-n", &ns, "-f", &f])
        .await;
    let obj = kc.get_json(&["configmap", &name, "-n", &ns]).await;
    assert_eq!(obj["metadata"]["resourceVersion"], rv);

    // Dropping b from the applied config removes it.
    let f = write(dir.path(), "2.yaml", &y("1", None));
    kc.ok(&["apply", "--server-side", "-n", &ns, "-f", &f])
        .await;
    let obj = kc.get_json(&["configmap", &name, "-n", &ns]).await;
    assert_eq!(obj["data"], serde_json::json!({"a": "1"}));

    // Another manager: conflict, then --force-conflicts.
    let f = write(dir.path(), "3.yaml", &y("x", None));
    let err = kc
        .fails(&[
            "apply",
            "--server-side",
            "--field-manager=other",
            "-n",
            &ns,
            "-f",
            &f,
        ])
        .await;
    assert!(err.to_lowercase().contains("conflict"), "{err}");
    kc.ok(&[
        "apply",
        "--server-side",
        "--field-manager=other",
        "--force-conflicts",
        "-n",
        &ns,
        "-f",
        &f,
    ])
    .await;
    let obj = kc.get_json(&["configmap", &name, "-n", &ns]).await;
    assert_eq!(obj["data"]["a"], "x");

    // kubectl patch (strategic by default, and merge/json).
    kc.ok(&[
        "patch",
        "configmap",
        &name,
        "-n",
        &ns,
        "-p",
        r#"{"data":{"p":"1"}}"#,
    ])
    .await;
    kc.ok(&[
        "patch",
        "configmap",
        &name,
        "-n",
        &ns,
        "--type=merge",
        "-p",
        r#"{"data":{"m":"1"}}"#,
    ])
    .await;
    kc.ok(&[
        "patch",
        "configmap",
        &name,
        "-n",
        &ns,
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/data/p"}]"#,
    ])
    .await;
    let obj = kc.get_json(&["configmap", &name, "-n", &ns]).await;
    assert_eq!(obj["data"], serde_json::json!({"a": "x", "m": "1"}));
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_describe_each_kind() {
    let h = Harness::start().await;
    let Some(kc) = Kubectl::new(&h) else {
        return;
    };
    let ns = h.namespace().await;
    let dir = tempfile::tempdir().unwrap();
    let node = unique("dnode");
    h.track_node(&node);
    let manifest = format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {node}\n{l}---\n\
         {pod}---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: dcm\n{l}data:\n  k: v\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: dnp\n{l}spec:\n  podSelector: {{}}\n---\n\
         apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: dlease\n{l}spec:\n  holderIdentity: n1\n",
        l = labels_yaml(""),
        pod = pod_yaml("dpod", IMAGE, ""),
    );
    let f = write(dir.path(), "all.yaml", &manifest);
    kc.ok(&["apply", "-n", &ns, "-f", &f]).await;
    let mut failed = Vec::new();
    for (kind, name, namespaced) in [
        ("namespace", ns.as_str(), false),
        ("node", node.as_str(), false),
        ("pod", "dpod", true),
        ("configmap", "dcm", true),
        ("networkpolicy", "dnp", true),
        ("lease", "dlease", true),
    ] {
        let mut a = vec!["describe", kind, name];
        if namespaced {
            a.extend_from_slice(&["-n", &ns]);
        }
        let o = kc.run(&a).await;
        let names_it = o
            .stdout
            .lines()
            .any(|l| l.starts_with("Name:") && l.contains(name));
        if !o.ok || !names_it {
            failed.push(format!("kubectl describe {kind}: {}", o.stderr.trim()));
        }
    }
    // `kubectl delete -f` removes everything the file made.
    let out = kc.ok(&["delete", "-n", &ns, "-f", &f]).await;
    assert_eq!(
        out.lines().filter(|l| l.ends_with(" deleted")).count(),
        5,
        "{out}"
    );
    assert!(failed.is_empty(), "{failed:#?}");
}
