//! `test-apiserver KUBECONFIG_OUT`: an API server standing in for a real cluster's (on the host's
//! loopback, no controllers besides the embedded server's own), for the lab's external-API mode.
//! Writes a kubeconfig for it, then serves until killed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let out = std::env::args()
        .nth(1)
        .expect("usage: test-apiserver KUBECONFIG_OUT");
    let api = sluice_apiserver::ApiServer::open(sluice_apiserver::Options::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let tmp = format!("{out}.tmp");
    std::fs::write(&tmp, sluice_apiserver::kubeconfig(&url, "external")).unwrap();
    std::fs::rename(&tmp, &out).unwrap();
    api.serve(listener).await.unwrap();
}
