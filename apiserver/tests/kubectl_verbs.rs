//! kubectl's verbs beyond the objects: `logs` is served from the log file the server is told of
//! (the lab's kubelet tells it), and what needs a container runtime (`exec`, `attach`,
//! `port-forward`) or a kind the server does not have (`create deployment`) is answered with a
//! Status that says what the server serves and where to go instead, never a bare 404.
//!
//! Skipped with a message when kubectl is missing, unless `CI` is set (then it fails).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::{Harness, TEST_LABEL};
use sluice_apiserver::{Options, PodLogs};
use tokio::io::{AsyncBufReadExt, BufReader};

const KUBECTL: &str = "/usr/bin/kubectl";

#[derive(Debug)]
struct Dir(PathBuf);

impl PodLogs for Dir {
    fn log_file(&self, namespace: &str, pod: &str, node: &str) -> Option<PathBuf> {
        Some(self.0.join(format!("{node}-{namespace}-{pod}.log")))
    }
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn command(h: &Harness, args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(KUBECTL);
    c.arg("--kubeconfig")
        .arg(&h.kubeconfig)
        .arg("--cache-dir")
        .arg(h.temp_dir().join("kubectl-cache"))
        .arg("--request-timeout=20s")
        .args(args)
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

async fn kubectl(h: &Harness, args: &[&str]) -> Out {
    let out = common::bounded_for(Duration::from_secs(30), command(h, args).output())
        .await
        .unwrap();
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn ok(h: &Harness, args: &[&str]) -> String {
    let o = kubectl(h, args).await;
    assert!(o.ok, "kubectl {args:?}: {}{}", o.stdout, o.stderr);
    o.stdout
}

async fn fails(h: &Harness, args: &[&str]) -> String {
    let o = kubectl(h, args).await;
    assert!(!o.ok, "kubectl {args:?} should fail: {}", o.stdout);
    assert!(
        !o.stderr
            .contains("the server could not find the requested resource\n")
            && !o
                .stderr
                .trim_end()
                .ends_with("the server could not find the requested resource"),
        "kubectl {args:?}: a bare 404: {}",
        o.stderr
    );
    o.stderr
}

fn have_kubectl() -> bool {
    if std::path::Path::new(KUBECTL).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "kubectl not found (and CI is set, so this is a failure, not a skip)"
    );
    eprintln!("SKIPPED: no {KUBECTL}");
    false
}

fn pod_yaml(name: &str, node: &str, containers: &[&str]) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{{TEST_LABEL}: \"true\"}}\nspec:\n  nodeName: {node}\n  terminationGracePeriodSeconds: 0\n  containers:\n"
    );
    for c in containers {
        y += &format!("  - {{name: {c}, image: sluice-lab}}\n");
    }
    y
}

async fn apply(h: &Harness, ns: &str, yaml: &str) {
    let file = h.temp_dir().join("pod.yaml");
    std::fs::write(&file, yaml).unwrap();
    ok(h, &["apply", "-n", ns, "-f", file.to_str().unwrap()]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_logs_reads_the_pods_log() {
    let logs = tempfile::tempdir().unwrap();
    let options = Options {
        pod_logs: Some(Arc::new(Dir(logs.path().to_path_buf()))),
        ..Options::default()
    };
    let Some(h) = Harness::embedded_only("the log source is the embedded server's", options).await
    else {
        return;
    };
    if !have_kubectl() {
        return;
    }
    let ns = h.namespace().await;
    apply(&h, &ns, &pod_yaml("p", "n1", &["main"])).await;
    let file = logs.path().join(format!("n1-{ns}-p.log"));
    // Before the pod's server writes its log: what a kubelet says of a starting container.
    let err = fails(&h, &["logs", "-n", &ns, "p"]).await;
    assert!(
        err.contains("is waiting to start: ContainerCreating"),
        "{err}"
    );
    std::fs::write(
        &file,
        "2026-01-01T00:00:01.5Z stderr F x/p: serving Tcp/80\n2026-01-01T00:00:02Z stderr F tcp/80: answered 10.244.1.2:40000\n",
    )
    .unwrap();
    let all = ok(&h, &["logs", "-n", &ns, "p"]).await;
    assert_eq!(
        all,
        "x/p: serving Tcp/80\ntcp/80: answered 10.244.1.2:40000\n"
    );
    let last = ok(&h, &["logs", "-n", &ns, "p", "--tail=1", "--timestamps"]).await;
    assert_eq!(
        last,
        "2026-01-01T00:00:02.000000000Z tcp/80: answered 10.244.1.2:40000\n"
    );
    let err = fails(&h, &["logs", "-n", &ns, "p", "-c", "nope"]).await;
    assert!(
        err.contains("container nope is not valid for pod p"),
        "{err}"
    );
    let err = fails(&h, &["logs", "-n", &ns, "p", "--previous"]).await;
    assert!(err.contains("previous terminated container"), "{err}");

    // -f: what is appended comes through; the stream ends with the pod.
    let mut follow = command(&h, &["logs", "-n", &ns, "p", "-f", "--tail=0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follow.stdout.take().unwrap()).lines();
    tokio::time::sleep(Duration::from_millis(500)).await;
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap();
        writeln!(
            f,
            "2026-01-01T00:00:03Z stderr F tcp/80: answered 10.244.2.9:41000"
        )
        .unwrap();
    }
    let line = common::bounded(lines.next_line()).await.unwrap();
    assert_eq!(line.as_deref(), Some("tcp/80: answered 10.244.2.9:41000"));
    ok(&h, &["delete", "pod", "-n", &ns, "p", "--wait=false"]).await;
    let status = common::bounded(follow.wait()).await.unwrap();
    assert!(status.success(), "kubectl logs -f ended with {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn what_needs_containers_or_other_kinds_says_so() {
    let Some(h) = Harness::embedded_only(
        "these answers are the embedded server's",
        Options::default(),
    )
    .await
    else {
        return;
    };
    if !have_kubectl() {
        return;
    }
    let ns = h.namespace().await;
    apply(&h, &ns, &pod_yaml("p", "n1", &["main"])).await;
    let running = r#"{"status": {"phase": "Running"}}"#;
    ok(
        &h,
        &[
            "patch",
            "pod",
            "-n",
            &ns,
            "p",
            "--subresource=status",
            "--type=merge",
            "-p",
            running,
        ],
    )
    .await;
    for args in [
        vec!["exec", "-n", &ns, "p", "--", "ls"],
        vec!["exec", "-n", &ns, "-i", "p", "--", "cat"],
        vec!["attach", "-n", &ns, "p"],
    ] {
        let err = fails(&h, &args).await;
        eprintln!("kubectl {args:?}: {err}");
        assert!(
            err.contains("not served by sluice's embedded lab API server")
                && err.contains(&format!("sluice lab exec [--name LAB] {ns}/p -- "))
                && err.contains("sluice lab up --kubernetes"),
            "kubectl {args:?}: {err}"
        );
    }
    let mut pf = command(&h, &["port-forward", "-n", &ns, "p", "18080:80"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // port-forward dials on the first connection: make one.
    let mut err = String::new();
    for _ in 0..50 {
        if tokio::net::TcpStream::connect("127.0.0.1:18080")
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Ok(Ok(out)) = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = pf.kill().await;
        let mut s = String::new();
        tokio::io::AsyncReadExt::read_to_string(pf.stderr.as_mut().unwrap(), &mut s)
            .await
            .map(|_| s)
    })
    .await
    {
        err = out;
    }
    assert!(
        err.contains("sluice lab probe"),
        "kubectl port-forward: {err}"
    );

    let err = fails(
        &h,
        &[
            "create",
            "deployment",
            "-n",
            &ns,
            "web",
            "--image=sluice-lab",
        ],
    )
    .await;
    assert!(
        err.contains("deployments.apps is not served by sluice's embedded lab API server")
            && err.contains("sluice lab up --kubernetes"),
        "{err}"
    );
    // Without a log source, logs say so too.
    let err = fails(&h, &["logs", "-n", &ns, "p"]).await;
    assert!(err.contains("pods/log is not served"), "{err}");
}
