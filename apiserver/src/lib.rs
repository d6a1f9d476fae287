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
//! ```
//!
//! Layout: `resources` (the kinds), `store` (objects, resourceVersions, history, state file),
//! `objects` (validation, defaulting, metadata rules), `patch` and `managed` (patch flavours and
//! server-side apply), `selector`, `ops` (write semantics), `status` (errors), and the HTTP
//! edge in `http`, `watch`, `discovery` and `table`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

mod decode;
mod discovery;
mod http;
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
}

impl Default for Options {
    fn default() -> Self {
        Self {
            state_file: None,
            watch_history: 10_000,
            bookmark_interval: Duration::from_secs(5),
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
    let url = yaml_quote(server_url);
    let name = yaml_quote(context);
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: {name}\n  \
           cluster:\n    \
             server: {url}\n\
         users:\n\
         - name: {name}\n  \
           user: {{}}\n\
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
