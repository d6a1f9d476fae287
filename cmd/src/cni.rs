//! The CNI plugin's edge: environment and stdin in, result or error JSON out on stdout, logs on
//! stderr. Everything here is plumbing; the verbs are in `sluice_net::cni::plugin`.

use sluice_net::cni::config::{peek_version, NetConf, Request};
use sluice_net::cni::{self, plugin, CniError, CniVersion, Command, ErrorCode};
use sluice_net::kernel::RtNetlink;
use std::io::{Read, Write};
use std::process::ExitCode;

/// Log level for the plugin's stderr (`error` … `trace`); the runtime shows it when a call fails.
const LOG_ENV: &str = "SLUICE_CNI_LOG";

/// The most of stdin that is read. A configuration is a few KiB; GC's list of attachments for a
/// node full of pods some tens of KiB.
const MAX_STDIN: u64 = 16 << 20;

pub fn main() -> ExitCode {
    init_logging();
    let mut stdin = Vec::new();
    let read = std::io::stdin().take(MAX_STDIN + 1).read_to_end(&mut stdin);
    let requested = peek_version(&stdin);
    let reply_version = requested
        .as_deref()
        .filter(|v| CniVersion::parse(v).is_some());
    let outcome = match read {
        Ok(n) if n as u64 > MAX_STDIN => Err(CniError::new(
            ErrorCode::Decoding,
            format!("the network configuration on stdin is larger than {MAX_STDIN} bytes"),
        )),
        Ok(_) => run(&stdin, requested.as_deref()),
        Err(e) => Err(CniError::new(ErrorCode::Io, format!("reading stdin: {e}"))),
    };
    let (json, code) = match outcome {
        Ok(None) => return ExitCode::SUCCESS,
        Ok(Some(json)) => (json, ExitCode::SUCCESS),
        Err(e) => {
            tracing::error!(code = e.code as u32, error = %e, "CNI call failed");
            (e.to_json(reply_version), ExitCode::FAILURE)
        }
    };
    let mut out = std::io::stdout().lock();
    // If stdout is gone the runtime has gone too; there is nobody left to tell.
    let _ = writeln!(out, "{json}").and_then(|_| out.flush());
    code
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env(LOG_ENV)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

fn run(stdin: &[u8], requested: Option<&str>) -> Result<Option<serde_json::Value>, CniError> {
    let verb = std::env::var("CNI_COMMAND").unwrap_or_default();
    let command = Command::parse(&verb).ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("CNI_COMMAND {verb:?} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"),
        )
    })?;
    if command == Command::Version {
        return Ok(Some(cni::version_info(requested)));
    }
    let conf = NetConf::parse(stdin)?;
    if !conf.version.has(command) {
        return Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!(
                "CNI version {} has no {} command",
                conf.version,
                command.as_str()
            ),
        ));
    }
    let outcome = run_verb(&conf, command, requested);
    // GC and STATUS are housekeeping; the runtime's pod calls are what operators watch.
    if matches!(command, Command::Add | Command::Del | Command::Check) {
        sluice_net::cni::stats::record(&conf.ipam_dir, command.as_str(), outcome.is_ok());
    }
    outcome
}

fn run_verb(
    conf: &NetConf,
    command: Command,
    requested: Option<&str>,
) -> Result<Option<serde_json::Value>, CniError> {
    let conf = conf.clone();
    let req = Request::from_env(command, |k| std::env::var(k).ok())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(ErrorCode::Io, format!("starting the runtime: {e}")))?;
    runtime.block_on(async {
        let pod_netns = match command {
            Command::Add | Command::Check => req.netns.as_deref(),
            _ => None,
        };
        let mut kernel = RtNetlink::connect(pod_netns)?;
        if let Ok(exe) = std::env::current_exe() {
            kernel = kernel.with_background_reclaim(exe);
        }
        match command {
            Command::Add => plugin::add(&conf, &req, &mut kernel).await.map(Some),
            Command::Del => plugin::del(&conf, &req, &mut kernel).await.map(|()| None),
            Command::Check => plugin::check(&conf, &req, &mut kernel).await.map(|()| None),
            Command::Status => plugin::status(&conf).map(|()| None),
            Command::Gc => plugin::gc(&conf, &mut kernel).await.map(|()| None),
            Command::Version => Ok(Some(cni::version_info(requested))),
        }
    })
}

/// `sluice __delete-link INDEX NAME`, spawned detached by DEL.
pub fn delete_link(index: u32, name: &str) -> ExitCode {
    let done = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(sluice_net::kernel::delete_link(index, name))
                .map_err(|e| e.to_string())
        });
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}
