//! Test harness: an embedded `ApiServer` on 127.0.0.1:0, or (with `SLUICE_E2E_KUBECONFIG` set)
//! a real API server named by that kubeconfig, so that the same scenarios check both.
//!
//! In the real-server mode nothing is started; every test works in namespaces (and on nodes) with
//! unique names, which the harness deletes (best effort) when it is dropped.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use sluice_apiserver::{kubeconfig, ApiServer, Options};
use tokio::task::JoinHandle;

/// Env var naming a kubeconfig of a real API server to run the scenarios against.
pub const E2E_ENV: &str = "SLUICE_E2E_KUBECONFIG";
/// Set (to anything) when the real cluster also runs controllers (garbage collector, namespace
/// controller), so that the "eventually" assertions that need them are checked too.
pub const E2E_CONTROLLERS_ENV: &str = "SLUICE_E2E_CONTROLLERS";

/// The bound on any single await in the tests.
pub const STEP: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the test if it takes longer than [`STEP`].
#[track_caller]
pub fn bounded<F: Future>(fut: F) -> impl Future<Output = F::Output> {
    bounded_for(STEP, fut)
}

/// Awaits `fut`, failing the test if it takes longer than `limit`.
#[track_caller]
pub fn bounded_for<F: Future>(limit: Duration, fut: F) -> impl Future<Output = F::Output> {
    let caller = std::panic::Location::caller();
    async move {
        match tokio::time::timeout(limit, fut).await {
            Ok(v) => v,
            Err(_) => panic!("timed out after {limit:?} (awaited at {caller})"),
        }
    }
}

/// True when the tests run against a real API server.
pub fn is_e2e() -> bool {
    std::env::var_os(E2E_ENV).is_some_and(|v| !v.is_empty())
}

/// True when the real API server also runs the controllers.
pub fn e2e_has_controllers() -> bool {
    std::env::var_os(E2E_CONTROLLERS_ENV).is_some_and(|v| !v.is_empty())
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A DNS-1123 label unique to this process and call, starting with `prefix`.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!("{prefix}-{:x}{:x}-{n}", std::process::id(), nanos % 0xfffff);
    assert!(name.len() <= 63, "name too long: {name}");
    name
}

/// The label every object the tests create carries, so that lists and watches on a shared
/// cluster only see the test's own objects.
pub const TEST_LABEL: &str = "sluice.test/run";

struct Embedded {
    options: Options,
    task: JoinHandle<std::io::Result<()>>,
}

#[derive(Default)]
struct Created {
    namespaces: Vec<String>,
    nodes: Vec<String>,
}

pub struct Harness {
    pub client: Client,
    pub config: kube::Config,
    /// `http://127.0.0.1:PORT` (or the real server's URL).
    pub url: String,
    /// A kubeconfig file for this server (kubectl's `--kubeconfig`).
    pub kubeconfig: PathBuf,
    embedded: Option<Embedded>,
    created: Arc<Mutex<Created>>,
    dir: tempfile::TempDir,
}

impl Harness {
    /// An in-memory embedded server, or the real server in e2e mode.
    pub async fn start() -> Harness {
        Self::start_with(Options::default()).await
    }

    /// An embedded server opened with `options`, or the real server in e2e mode (where `options`
    /// have no effect).
    pub async fn start_with(options: Options) -> Harness {
        Self::start_in(options, tempfile::tempdir().expect("tempdir")).await
    }

    async fn start_in(options: Options, dir: tempfile::TempDir) -> Harness {
        if let Some(path) = std::env::var_os(E2E_ENV).filter(|v| !v.is_empty()) {
            let path = PathBuf::from(path);
            let kc = Kubeconfig::read_from(&path).expect("read SLUICE_E2E_KUBECONFIG");
            let config = bounded(kube::Config::from_custom_kubeconfig(
                kc,
                &KubeConfigOptions::default(),
            ))
            .await
            .expect("kube config from SLUICE_E2E_KUBECONFIG");
            let url = config.cluster_url.to_string();
            let client = Client::try_from(config.clone()).expect("client");
            return Harness {
                client,
                config,
                url,
                kubeconfig: path,
                embedded: None,
                created: Arc::default(),
                dir,
            };
        }
        let api = ApiServer::open(options.clone()).expect("ApiServer::open");
        let (task, url) = serve(api).await;
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_text(&url)).expect("write kubeconfig");
        let config = client_config(&url);
        let client = Client::try_from(config.clone()).expect("client");
        Harness {
            client,
            config,
            url,
            kubeconfig,
            embedded: Some(Embedded { options, task }),
            created: Arc::default(),
            dir,
        }
    }

    /// An embedded server only: `None` (after printing why) in e2e mode.
    pub async fn embedded_only(why: &str, options: Options) -> Option<Harness> {
        if is_e2e() {
            eprintln!("SKIPPED against a real API server: {why}");
            return None;
        }
        Some(Self::start_with(options).await)
    }

    /// An embedded server persisting to a state file in the harness's temp dir (`None` in e2e
    /// mode, after printing why).
    pub async fn persistent(why: &str) -> Option<Harness> {
        if is_e2e() {
            eprintln!("SKIPPED against a real API server: {why}");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let options = Options {
            state_file: Some(dir.path().join("state.json")),
            ..Options::default()
        };
        Some(Self::start_in(options, dir).await)
    }

    pub fn is_e2e(&self) -> bool {
        self.embedded.is_none()
    }

    pub fn state_file(&self) -> Option<&Path> {
        self.embedded.as_ref()?.options.state_file.as_deref()
    }

    pub fn temp_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the embedded server and opens a new one on the same state file (new port; `client`,
    /// `url` and `kubeconfig` are updated).
    pub async fn restart(&mut self) {
        let emb = self
            .embedded
            .as_mut()
            .expect("restart needs an embedded server");
        assert!(
            emb.options.state_file.is_some(),
            "restart needs a state file"
        );
        emb.task.abort();
        let _ = bounded(&mut emb.task).await;
        let api = ApiServer::open(emb.options.clone()).expect("ApiServer::open (restart)");
        let (task, url) = serve(api).await;
        emb.task = task;
        std::fs::write(&self.kubeconfig, kubeconfig_text(&url)).expect("write kubeconfig");
        self.config = client_config(&url);
        self.client = Client::try_from(self.config.clone()).expect("client");
        self.url = url;
    }

    /// Creates a namespace with a unique name (deleted when the harness drops, in e2e mode).
    pub async fn namespace(&self) -> String {
        let name = unique("t");
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(TEST_LABEL.to_string(), "true".to_string())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let api: Api<Namespace> = Api::all(self.client.clone());
        bounded(api.create(&PostParams::default(), &ns))
            .await
            .expect("create test namespace");
        self.created.lock().unwrap().namespaces.push(name.clone());
        if self.is_e2e() {
            // A real server's ServiceAccount admission refuses pods until the namespace's
            // `default` ServiceAccount exists; without a controller manager nobody makes it.
            let sa = ServiceAccount {
                metadata: ObjectMeta {
                    name: Some("default".into()),
                    ..ObjectMeta::default()
                },
                ..ServiceAccount::default()
            };
            let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &name);
            match bounded(api.create(&PostParams::default(), &sa)).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                // A server without ServiceAccounts (e.g. the embedded one) has no such admission.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => panic!("create default ServiceAccount: {e}"),
            }
        }
        name
    }

    /// Records a namespace the test created itself, for cleanup.
    pub fn track_namespace(&self, name: &str) {
        self.created
            .lock()
            .unwrap()
            .namespaces
            .push(name.to_string());
    }

    /// Records a node the test created, for cleanup.
    pub fn track_node(&self, name: &str) {
        self.created.lock().unwrap().nodes.push(name.to_string());
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(emb) = &self.embedded {
            emb.task.abort();
            return;
        }
        // Real server: delete what the test made, best effort, on a runtime of our own (Drop
        // can't await, and the test's runtime may be shutting down).
        let created = std::mem::take(&mut *self.created.lock().unwrap());
        if created.namespaces.is_empty() && created.nodes.is_empty() {
            return;
        }
        let config = self.config.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(client) = Client::try_from(config) else {
                    return;
                };
                let dp = DeleteParams::background();
                let nodes: Api<Node> = Api::all(client.clone());
                for n in &created.nodes {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), nodes.delete(n, &dp)).await;
                }
                let nss: Api<Namespace> = Api::all(client);
                for n in &created.namespaces {
                    let _ = tokio::time::timeout(Duration::from_secs(5), nss.delete(n, &dp)).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

async fn serve(api: ApiServer) -> (JoinHandle<std::io::Result<()>>, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let url = format!("http://{}", listener.local_addr().expect("local_addr"));
    let task = tokio::spawn(api.serve(listener));
    (task, url)
}

fn kubeconfig_text(url: &str) -> String {
    kubeconfig(url, "sluice-test")
}

fn client_config(url: &str) -> kube::Config {
    let mut config = kube::Config::new(url.parse().expect("url"));
    config.default_namespace = "default".to_string();
    config
}

/// Unwraps the `kube::Error::Api` status of a failed call, failing the test on success or on
/// any other error.
#[track_caller]
pub fn api_error<T: std::fmt::Debug>(r: kube::Result<T>) -> kube::core::Status {
    match r {
        Err(kube::Error::Api(s)) => *s,
        Err(e) => panic!("expected an API error (a Status), got another error: {e:?}"),
        Ok(v) => panic!("expected an API error, got success: {v:?}"),
    }
}

/// Asserts that a call failed with `code` and `reason`, returning the Status.
#[track_caller]
pub fn expect_status<T: std::fmt::Debug>(
    r: kube::Result<T>,
    code: u16,
    reason: &str,
) -> kube::core::Status {
    let s = api_error(r);
    assert_eq!(
        (s.code, s.reason.as_str()),
        (code, reason),
        "unexpected status: {s:?}"
    );
    s
}

/// Parses a resourceVersion as the integer kube-apiserver (etcd) uses, to compare order.
#[track_caller]
pub fn rv_num(rv: Option<&String>) -> u64 {
    let rv = rv.expect("resourceVersion present");
    rv.parse()
        .unwrap_or_else(|_| panic!("resourceVersion {rv:?} is not an integer"))
}

/// Polls `check` every 50 ms until it returns `Some`, failing after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Ok(Some(v)) = tokio::time::timeout(STEP, check()).await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("not within {limit:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
