//! What the agent reports about itself on its health port (DESIGN.md: TCP 9099): liveness
//! (`/healthz`, `/liveness`), readiness (`/readyz`, `/readiness`), Prometheus metrics
//! (`/metrics`) and the node's status document (`/status`, read by `sluice status`).
//!
//! The rules are pure functions of a [`Snapshot`], so every state is unit-tested without a
//! network; the router only renders them.

pub mod metrics;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

/// The state readiness and liveness are judged on.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The held subnet lease: subnet and expiry.
    pub lease: Option<(String, SystemTime)>,
    /// The datapath was programmed for the peers known at that time.
    pub datapath_programmed: bool,
    /// The last datapath error, if the last pass failed.
    pub datapath_error: Option<String>,
    /// Peers no path reaches (`overlay: never` and another underlay subnet), each with why.
    pub unreachable_peers: Vec<String>,
    /// Every watch the agent depends on has listed once.
    pub watches_synced: bool,
    /// Why the last sluice-config was rejected (the last good one is kept).
    pub config_error: Option<String>,
    /// Why the last policy pass failed (the rules in the kernel stay as they were).
    pub policy_error: Option<String>,
    /// Each control loop's last heartbeat.
    pub heartbeats: BTreeMap<String, Instant>,
    /// The node's status document (`sluice status`).
    pub status: serde_json::Value,
}

/// 200 only when the node holds its lease, its datapath is programmed, its watches have synced,
/// its configuration parsed and its last policy pass applied; otherwise every reason why not.
pub fn readiness(s: &Snapshot, now: SystemTime) -> Result<(), Vec<String>> {
    let mut why = Vec::new();
    match &s.lease {
        None => why.push("no subnet lease held yet".to_string()),
        Some((subnet, expires)) if *expires <= now => why.push(format!(
            "the lease of {subnet} has expired (renewals failing)"
        )),
        Some(_) => {}
    }
    if !s.datapath_programmed {
        why.push("datapath not programmed yet".into());
    }
    if let Some(e) = &s.datapath_error {
        why.push(format!("datapath: {e}"));
    }
    for peer in &s.unreachable_peers {
        why.push(format!("peer unreachable: {peer}"));
    }
    if !s.watches_synced {
        why.push("watches not synced yet".into());
    }
    if let Some(e) = &s.config_error {
        why.push(format!("sluice-config: {e}"));
    }
    if let Some(e) = &s.policy_error {
        why.push(format!("policy: {e}"));
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(why)
    }
}

/// Fails only when a control loop has not beaten for `timeout`: a wedged loop, never a slow or
/// absent API server (the loops keep beating while they retry).
pub fn liveness(s: &Snapshot, now: Instant, timeout: Duration) -> Result<(), Vec<String>> {
    let why: Vec<String> = s
        .heartbeats
        .iter()
        .filter(|(_, beat)| now.saturating_duration_since(**beat) > timeout)
        .map(|(name, beat)| {
            format!(
                "loop {name} has not run for {}s",
                now.saturating_duration_since(*beat).as_secs()
            )
        })
        .collect();
    if why.is_empty() {
        Ok(())
    } else {
        Err(why)
    }
}

/// Shared handle: the agent's loops write, the HTTP server reads.
#[derive(Clone)]
pub struct Health {
    state: Arc<Mutex<Snapshot>>,
    pub metrics: Arc<metrics::Metrics>,
    liveness_timeout: Duration,
}

impl Health {
    pub fn new(liveness_timeout: Duration, version: &str, commit: &str) -> Self {
        Self {
            state: Arc::new(Mutex::new(Snapshot::default())),
            metrics: Arc::new(metrics::Metrics::new(version, commit)),
            liveness_timeout,
        }
    }

    /// Changes the state under its lock.
    pub fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut s);
    }

    pub fn snapshot(&self) -> Snapshot {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records that loop `name` completed a pass.
    pub fn beat(&self, name: &str) {
        self.update(|s| {
            s.heartbeats.insert(name.to_string(), Instant::now());
        });
    }

    /// Every endpoint, `/status` included: for listeners only the node itself can reach.
    pub fn router(&self) -> Router {
        self.public_router()
            .route("/status", get(self.status_handler()))
    }

    fn status_handler(
        &self,
    ) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>
           + Clone
           + Send
           + Sync
           + 'static {
        let h = self.clone();
        move || {
            let h = h.clone();
            Box::pin(async move { axum::Json(h.snapshot().status).into_response() })
        }
    }

    /// What anyone who reaches the health port may ask: liveness, readiness and metrics. Not
    /// `/status`, which names every peer's underlay address, subnet and VTEP MAC.
    pub fn public_router(&self) -> Router {
        let live = {
            let h = self.clone();
            move || {
                let h = h.clone();
                async move {
                    verdict(
                        liveness(&h.snapshot(), Instant::now(), h.liveness_timeout),
                        "ok",
                    )
                }
            }
        };
        let ready = {
            let h = self.clone();
            move || {
                let h = h.clone();
                async move { verdict(readiness(&h.snapshot(), SystemTime::now()), "ready") }
            }
        };
        let metrics = {
            let h = self.clone();
            move || {
                let h = h.clone();
                async move {
                    match h.metrics.encode() {
                        Ok(text) => (
                            StatusCode::OK,
                            [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
                            text,
                        )
                            .into_response(),
                        Err(e) => {
                            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
                        }
                    }
                }
            }
        };
        Router::new()
            .route("/healthz", get(live.clone()))
            .route("/liveness", get(live))
            .route("/readyz", get(ready.clone()))
            .route("/readiness", get(ready))
            .route("/metrics", get(metrics))
    }

    /// Serves every endpoint on `listener` until the process ends.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        axum::serve(listener, self.router()).await
    }

    /// Serves on a listener bound to every address: `/status` answers only connections from
    /// loopback (the node itself); anyone else gets 403 there and the public endpoints.
    pub async fn serve_status_to_loopback(
        self,
        listener: tokio::net::TcpListener,
    ) -> std::io::Result<()> {
        use axum::extract::ConnectInfo;
        let status = self.status_handler();
        let router = self.public_router().route(
            "/status",
            get(
                move |ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>| {
                    let status = status.clone();
                    async move {
                        if is_local(peer.ip()) {
                            status().await
                        } else {
                            (
                                StatusCode::FORBIDDEN,
                                "/status is served on loopback only\n",
                            )
                                .into_response()
                        }
                    }
                },
            ),
        );
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
    }

    /// Serves `addr`'s share of the endpoints: all of them when `addr` is loopback; the public
    /// ones when it is another address, with `/status` on `127.0.0.1` at the same port beside
    /// it; and when it is the unspecified address, one listener that answers `/status` to
    /// loopback peers only (a second socket on the same port would collide with it).
    pub async fn serve_at(self, addr: std::net::SocketAddr) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        if addr.ip().is_loopback() {
            return self.serve(listener).await;
        }
        if addr.ip().is_unspecified() {
            return self.serve_status_to_loopback(listener).await;
        }
        let local = std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port());
        let local_listener = tokio::net::TcpListener::bind(local).await?;
        let public = axum::serve(listener, self.public_router());
        let all = axum::serve(local_listener, self.router());
        tokio::try_join!(
            std::future::IntoFuture::into_future(public),
            std::future::IntoFuture::into_future(all)
        )
        .map(|_| ())
    }
}

/// A peer on the node itself: loopback, or an IPv4-mapped loopback on a dual-stack socket.
fn is_local(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

fn verdict(r: Result<(), Vec<String>>, ok: &'static str) -> Response {
    match r {
        Ok(()) => (StatusCode::OK, format!("{ok}\n")).into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", why.join("\n")),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests;
