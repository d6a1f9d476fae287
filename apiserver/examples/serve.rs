//! Runs the API server on 127.0.0.1 and writes a kubeconfig, for trying it with kubectl.
//!
//! `cargo run -p sluice-apiserver --example serve -- /tmp/kubeconfig [state-file]`

use sluice_apiserver::{kubeconfig, ApiServer, Options};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let kubeconfig_path = args
        .next()
        .unwrap_or_else(|| "/tmp/sluice-kubeconfig".into());
    let state_file = args.next().map(Into::into);
    let api = ApiServer::open(Options {
        state_file,
        ..Options::default()
    })?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    std::fs::write(&kubeconfig_path, kubeconfig(&url, "sluice-lab"))?;
    eprintln!("serving on {url}; kubeconfig at {kubeconfig_path}");
    api.serve(listener).await?;
    Ok(())
}
