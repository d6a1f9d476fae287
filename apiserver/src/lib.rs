//! The lab's embedded Kubernetes-compatible API server.
//!
//! INTERFACE CONTRACT (the lab and the tests are written against exactly this; keep it):
//!
//! ```ignore
//! let api = ApiServer::open(Options { state_file: Some(path), ..Options::default() })?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let url = format!("http://{}", listener.local_addr()?);
//! tokio::spawn(api.clone().serve(listener));          // any number of listeners
//! std::fs::write(kubeconfig_path, kubeconfig(&url, "sluice-lab"))?;
//!
//! // or HTTPS, serving only clients whose certificate the CA signed (the lab does this):
//! let tls = TlsConfig::new(&client_ca_pem, &serving_cert_pem, &serving_key_pem)?;
//! tokio::spawn(api.clone().serve_tls(listener, tls));
//! let text = kubeconfig_with_client_cert(&url, "sluice-lab", ClientCredential { .. });
//! ```
//!
//! Layout: `resources` (the kinds), `store` (objects, resourceVersions, history, state file),
//! `objects` (validation, defaulting, metadata rules), `patch` and `managed` (patch flavours and
//! server-side apply), `decode` (typed decoding, `fieldValidation`), `selector`, `ops` (write
//! semantics), `status` (errors), and the HTTP edge in `http`, `tls`, `watch`, `discovery` and
//! `table`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use logs::PodLogs;
pub use tls::{TlsConfig, TlsError};

/// The Kubernetes version the server says it is (`/version`'s `gitVersion`).
pub const KUBERNETES_VERSION: &str = discovery::GIT_VERSION;

mod decode;
mod discovery;
mod http;
mod logs;
mod managed;
mod objects;
mod ops;
mod patch;
mod proto;
mod resources;
mod selector;
mod status;
mod store;
mod table;
mod tls;
mod unserved;
mod validate;
mod watch;

/// How the server is opened.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where state is persisted (written atomically after each change); `None` keeps it in memory.
    pub state_file: Option<PathBuf>,
    /// How many past events a watch can resume from; older resourceVersions get 410 Gone.
    pub watch_history: usize,
    /// How often a watch that asked for bookmarks (`allowWatchBookmarks=true`) gets one.
    pub bookmark_interval: Duration,
    /// Where pods' logs are, for `pods/log` (`kubectl logs`); without it, `pods/log` says so.
    pub pod_logs: Option<Arc<dyn PodLogs>>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            state_file: None,
            watch_history: 10_000,
            bookmark_interval: Duration::from_secs(5),
            pod_logs: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("state file {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

struct Inner {
    store: Mutex<store::Store>,
    options: Options,
    reaper_started: AtomicBool,
}

/// A handle to the server; cheap to clone (shared state).
#[derive(Clone)]
pub struct ApiServer {
    inner: Arc<Inner>,
}

impl ApiServer {
    /// Loads the state file if it exists (else starts empty with namespaces `default`,
    /// `kube-system`, `kube-public`, `kube-node-lease`).
    pub fn open(options: Options) -> Result<Self, ApiServerError> {
        let now = objects::timestamp(jiff::Timestamp::now());
        let store = store::Store::open(
            options.state_file.clone(),
            options.watch_history.max(1),
            &now,
        )?;
        Ok(Self {
            inner: Arc::new(Inner {
                store: Mutex::new(store),
                options,
                reaper_started: AtomicBool::new(false),
            }),
        })
    }

    /// The HTTP routes, for embedding or for `tower::ServiceExt::oneshot` in tests.
    pub fn router(&self) -> axum::Router {
        self.start_reaper();
        http::router(self.clone())
    }

    /// Serves plain HTTP on `listener` until the process ends (or the task is aborted).
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let router = self.router();
        axum::serve(listener, router).await
    }

    /// Serves HTTPS on `listener`, answering only clients whose certificate chains to `tls`'s
    /// client CA (the others get 401), until the process ends (or the task is aborted).
    pub async fn serve_tls(
        self,
        listener: tokio::net::TcpListener,
        tls: TlsConfig,
    ) -> std::io::Result<()> {
        let router = self.router();
        tls::serve(listener, router, tls).await
    }

    fn lock(&self) -> MutexGuard<'_, store::Store> {
        self.inner
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f` on the store, then writes the state file if `f` changed anything.
    pub(crate) fn with_store<R>(&self, f: impl FnOnce(&mut store::Store) -> R) -> R {
        let mut s = self.lock();
        let r = f(&mut s);
        s.flush();
        r
    }

    pub(crate) fn options(&self) -> &Options {
        &self.inner.options
    }

    /// Starts (once) the task that finishes graceful pod deletions; it ends with the server.
    fn start_reaper(&self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.inner.reaper_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        handle.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let api = ApiServer { inner };
                let ctx = ops::Ctx {
                    now: jiff::Timestamp::now(),
                    manager: "kube-apiserver".into(),
                    ..ops::Ctx::default()
                };
                api.with_store(|s| ops::reap(s, &ctx));
            }
        });
    }
}

/// Quotes a string for YAML (double-quoted style).
fn yaml_quote(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// A kubeconfig (YAML) for a server at `server_url` (`http://host:port`), no credentials,
/// one cluster, user and context all named `context`, namespace `default`.
pub fn kubeconfig(server_url: &str, context: &str) -> String {
    kubeconfig_text(server_url, context, "", "{}")
}

/// A client certificate and the CA that signed the server's, for a kubeconfig (all PEM).
#[derive(Debug, Clone, Copy)]
pub struct ClientCredential<'a> {
    pub server_ca_pem: &'a str,
    pub cert_pem: &'a str,
    pub key_pem: &'a str,
}

/// A kubeconfig (YAML) for an HTTPS server at `server_url` whose certificate `cred`'s CA
/// signed, authenticating with `cred`'s client certificate, everything embedded (as kind writes
/// its clusters' kubeconfigs); names as in [`kubeconfig`]. It holds a private key: write it 0600.
pub fn kubeconfig_with_client_cert(
    server_url: &str,
    context: &str,
    cred: ClientCredential<'_>,
) -> String {
    use base64::Engine as _;
    let b64 = |pem: &str| base64::engine::general_purpose::STANDARD.encode(pem);
    let cluster = format!(
        "\n    certificate-authority-data: {}",
        b64(cred.server_ca_pem)
    );
    let user = format!(
        "\n    client-certificate-data: {}\n    client-key-data: {}",
        b64(cred.cert_pem),
        b64(cred.key_pem)
    );
    kubeconfig_text(server_url, context, &cluster, &user)
}

/// The kubeconfig's text; `cluster_extra` follows the server line, `user` is the user's body
/// (`{}`, or lines that each start with a newline and four spaces).
fn kubeconfig_text(server_url: &str, context: &str, cluster_extra: &str, user: &str) -> String {
    let url = yaml_quote(server_url);
    let name = yaml_quote(context);
    let user = if user == "{}" {
        " {}".to_string()
    } else {
        user.to_string()
    };
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: {name}\n  \
           cluster:\n    \
             server: {url}{cluster_extra}\n\
         users:\n\
         - name: {name}\n  \
           user:{user}\n\
         contexts:\n\
         - name: {name}\n  \
           context:\n    \
             cluster: {name}\n    \
             user: {name}\n    \
             namespace: default\n\
         current-context: {name}\n\
         preferences: {{}}\n"
    )
}
