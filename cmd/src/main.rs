//! `sluice`: one binary, named by its call. Invoked as `sluice-cni` (the basename of argv[0], as
//! container runtimes call CNI plugins) it is the CNI plugin; otherwise the subcommand decides.

mod agent;
mod cni;
mod install;
mod lab;
mod status;

#[cfg(test)]
mod manifest_tests;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// jemalloc, not musl's malloc: the static musl binary's userspace WireGuard allocates a
/// buffer per packet in one thread and frees it in another, which musl's mallocng serialises
/// (a third of the throughput lost). Its options are compiled in (`.cargo/config.toml`): one
/// arena and a background thread that returns freed memory after 100 ms keep the agent's
/// memory near what musl's malloc used.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The name the CNI plugin is installed and invoked under.
const CNI_PLUGIN_NAME: &str = "sluice-cni";

#[derive(Parser)]
#[command(
    name = "sluice",
    about = "sluice: a Kubernetes network provider",
    disable_version_flag = true
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print version, git commit and build profile.
    Version {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the CNI plugin, as `sluice-cni` would (CNI_* environment, config on stdin).
    Cni,
    /// Internal: delete one link, detached from the CNI DEL that asked for it.
    #[command(name = "__delete-link", hide = true)]
    DeleteLink { index: u32, name: String },
    /// The node agent: subnet lease, tunnels to the peers, masquerade.
    Agent(agent::AgentArgs),
    /// The DaemonSet's init step: install the plugin as sluice-cni and the CNI config.
    InstallCni(install::InstallArgs),
    /// What this node's agent holds and sees (its subnet, lease, tunnel, peers, policy).
    Status(status::StatusArgs),
    /// A cluster on one machine: nodes and pods in network namespaces, an embedded API server.
    #[command(subcommand)]
    Lab(lab::LabCmd),
}

fn main() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let called_as = std::path::Path::new(&argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if called_as == CNI_PLUGIN_NAME {
        return cni::main();
    }
    match Cli::parse().command {
        Cmd::Version { json } => {
            print_version(json);
            ExitCode::SUCCESS
        }
        Cmd::Cni => cni::main(),
        Cmd::DeleteLink { index, name } => cni::delete_link(index, &name),
        Cmd::Agent(args) => {
            init_tracing();
            match agent::main(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "sluice agent failed");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::InstallCni(args) => edge("install-cni", install::run(&args)),
        Cmd::Status(args) => edge("status", status::run(&args)),
        Cmd::Lab(cmd) => {
            init_tracing();
            match lab::main(cmd) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sluice lab: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn print_version(json: bool) {
    let version = env!("CARGO_PKG_VERSION");
    let commit = env!("SLUICE_GIT_COMMIT");
    let profile = env!("SLUICE_BUILD_PROFILE");
    if json {
        let v = serde_json::json!({ "version": version, "commit": commit, "profile": profile });
        println!("{v}");
    } else {
        println!("sluice {version} (commit {commit}, {profile} build)");
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Prints an error at the binary's edge with its whole context chain.
fn edge(what: &str, r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice {what}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
