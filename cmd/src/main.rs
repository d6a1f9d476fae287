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

/// Changes the level of the logs (sluice-config's `log-level`), unless `RUST_LOG` fixed it at start.
static LOG_FILTER: std::sync::OnceLock<
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
> = std::sync::OnceLock::new();

/// Logs to stderr, filtered by `RUST_LOG` when it is set (it then wins over `log-level`), else at
/// `info` until sluice-config says otherwise.
fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let from_env = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    let filter = from_env
        .as_deref()
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let output = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // Dynamic (judged per event, not cached per callsite): it depends on a moment.
        .with_filter(tracing_subscriber::filter::dynamic_filter_fn(|meta, _| {
            !sluice_net::wireguard::device::is_shutdown_noise(meta)
        }));
    if tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .is_ok()
        && from_env.is_none()
    {
        let _ = LOG_FILTER.set(handle);
    }
}

/// Applies sluice-config's `log-level`; false when `RUST_LOG` decides instead.
pub fn set_log_level(level: &str) -> bool {
    let Some(handle) = LOG_FILTER.get() else {
        return false;
    };
    handle
        .reload(tracing_subscriber::EnvFilter::new(level))
        .is_ok()
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
