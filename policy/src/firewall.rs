//! One driver trait for every firewall mechanism (netavark's shape): render, observe what
//! sluice owns in the kernel, apply only when it differs. [`auto`] picks the mechanism for the
//! `policy-backend` key; [`FakeFirewall`] stands in for the kernel in tests.

use crate::iptables::{self, IptablesScript};
use crate::ir::PolicyIr;
use crate::nft::{self, NftScript};
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

/// The mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nftables,
    Iptables,
}

/// Desired rules in one mechanism's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendered {
    Nft(NftScript),
    Iptables(IptablesScript),
}

impl Rendered {
    /// The hash the rules carry in the kernel.
    pub fn hash(&self) -> &str {
        match self {
            Self::Nft(s) => &s.hash,
            Self::Iptables(s) => &s.hash,
        }
    }

    pub fn render(backend: Backend, ir: &PolicyIr) -> Self {
        match backend {
            Backend::Nftables => Self::Nft(nft::render(ir)),
            Backend::Iptables => Self::Iptables(iptables::render(ir)),
        }
    }
}

/// What sluice's rules in the kernel say about themselves.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    /// The hash of the rules sluice last wrote; `None` when they are absent (or incomplete).
    pub hash: Option<String>,
}

/// What an apply did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// False when the kernel already held the desired rules.
    pub written: bool,
    /// True when only the difference was written (not the whole of sluice's rules).
    pub incremental: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("running {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} {op} failed: {stderr}")]
    Command {
        program: String,
        op: &'static str,
        stderr: String,
    },
    #[error("parsing nft's JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("rules rendered for another backend (this one is {want:?})")]
    WrongBackend { want: Backend },
    #[error("unknown policy-backend {0:?} (nftables, iptables or auto)")]
    UnknownBackend(String),
    #[error("no working firewall: nft failed ({nft}) and iptables failed ({iptables})")]
    NoBackend { nft: String, iptables: String },
}

/// A firewall mechanism. Calls block (they run a binary); call them off the async runtime.
pub trait Firewall: Send + Sync {
    fn backend(&self) -> Backend;

    /// The IR in this mechanism's text (pure).
    fn render(&self, ir: &PolicyIr) -> Rendered {
        Rendered::render(self.backend(), ir)
    }

    /// What sluice owns in the kernel now.
    fn observe(&self) -> Result<Observed, FirewallError>;

    /// Makes the kernel hold `desired`: observes, and writes (atomically where the mechanism
    /// can) only when the hash differs. Rules of others are never touched.
    fn apply(&self, desired: &Rendered) -> Result<Applied, FirewallError>;

    /// Removes everything sluice wrote with this mechanism (a switch of backend, uninstall).
    fn remove(&self) -> Result<(), FirewallError>;
}

/// How binaries are run: directly, or behind a wrapper such as `ip netns exec NAME` (tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exec {
    pub wrapper: Vec<String>,
}

impl Exec {
    /// Binaries run as they are, in the caller's network namespace.
    pub fn host() -> Self {
        Self::default()
    }

    /// Binaries run in the named network namespace (`ip netns exec NAME`).
    pub fn in_netns(name: &str) -> Self {
        Self {
            wrapper: vec!["ip".into(), "netns".into(), "exec".into(), name.into()],
        }
    }

    /// The network namespace the binaries run in, when it is not the caller's.
    pub fn netns(&self) -> Option<&str> {
        match self.wrapper.as_slice() {
            [ip, netns, exec, name] if ip == "ip" && netns == "netns" && exec == "exec" => {
                Some(name)
            }
            _ => None,
        }
    }

    fn command(&self, program: &str) -> Command {
        match self.wrapper.split_first() {
            None => Command::new(program),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
        }
    }

    /// Runs `program args`, feeding `stdin`; the output whatever the exit status.
    pub fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<Output, FirewallError> {
        let spawn = |source| FirewallError::Spawn {
            program: program.to_string(),
            source,
        };
        let mut cmd = self.command(program);
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = std::time::Instant::now();
        let mut child = cmd.spawn().map_err(spawn)?;
        let pipe = child.stdin.take();
        // Fed from a thread so that a child writing much before reading cannot deadlock us.
        let writer = std::thread::scope(|s| {
            let w = s.spawn(|| match (stdin, pipe) {
                (Some(text), Some(mut p)) => p.write_all(text.as_bytes()),
                _ => Ok(()),
            });
            let out = child.wait_with_output();
            (w.join(), out)
        });
        let out = writer.1.map_err(spawn)?;
        tracing::debug!(program, args = ?args, stdin = stdin.map_or(0, str::len), status = ?out.status.code(), took = ?started.elapsed(), "ran");
        if let Ok(Err(e)) = writer.0 {
            // A broken pipe means the child quit early: its exit status tells why.
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return Err(spawn(e));
            }
        }
        Ok(out)
    }

    /// Whether `program` can be started at all.
    pub fn has(&self, program: &str) -> bool {
        self.run(program, &["--version"], None).is_ok_and(|o| {
            // `ip netns exec` reports a missing program with its own exit status.
            o.status.success() || !String::from_utf8_lossy(&o.stderr).contains("No such file")
        })
    }
}

/// The firewall for the `policy-backend` key: `nftables`, `iptables`, or `auto` (nftables
/// where `nft` works, else iptables in the backend the host already uses).
pub fn auto(exec: Exec, choice: &str) -> Result<Box<dyn Firewall>, FirewallError> {
    match choice {
        "nftables" => Ok(Box::new(nft::NftCli::new(exec))),
        "iptables" => Ok(Box::new(iptables::IptablesRestore::detect(exec)?)),
        "auto" => {
            let n = nft::NftCli::new(exec.clone());
            if n.works() {
                return Ok(Box::new(n));
            }
            match iptables::IptablesRestore::detect(exec) {
                Ok(i) => Ok(Box::new(i)),
                Err(e) => Err(FirewallError::NoBackend {
                    nft: "nft list tables failed".into(),
                    iptables: e.to_string(),
                }),
            }
        }
        other => Err(FirewallError::UnknownBackend(other.to_string())),
    }
}

/// An in-memory firewall: holds the last rules applied and counts writes.
#[derive(Debug)]
pub struct FakeFirewall {
    pub backend: Backend,
    state: Mutex<FakeState>,
}

#[derive(Debug, Default)]
struct FakeState {
    current: Option<Rendered>,
    writes: usize,
    fail_next: bool,
}

impl FakeFirewall {
    pub fn new(backend: Backend) -> Self {
        Self {
            backend,
            state: Mutex::new(FakeState::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The rules in the fake kernel.
    pub fn current(&self) -> Option<Rendered> {
        self.state().current.clone()
    }

    /// How many times rules were written.
    pub fn writes(&self) -> usize {
        self.state().writes
    }

    /// Makes the next apply fail, leaving the old rules in place.
    pub fn fail_next(&self) {
        self.state().fail_next = true;
    }
}

impl Firewall for FakeFirewall {
    fn backend(&self) -> Backend {
        self.backend
    }

    fn observe(&self) -> Result<Observed, FirewallError> {
        Ok(Observed {
            hash: self.state().current.as_ref().map(|r| r.hash().to_string()),
        })
    }

    fn apply(&self, desired: &Rendered) -> Result<Applied, FirewallError> {
        if matches!(
            (self.backend, desired),
            (Backend::Nftables, Rendered::Iptables(_)) | (Backend::Iptables, Rendered::Nft(_))
        ) {
            return Err(FirewallError::WrongBackend { want: self.backend });
        }
        let mut s = self.state();
        if std::mem::take(&mut s.fail_next) {
            return Err(FirewallError::Command {
                program: "fake".into(),
                op: "apply",
                stderr: "injected failure".into(),
            });
        }
        if s.current.as_ref().map(Rendered::hash) == Some(desired.hash()) {
            return Ok(Applied {
                written: false,
                incremental: false,
            });
        }
        s.current = Some(desired.clone());
        s.writes += 1;
        Ok(Applied {
            written: true,
            incremental: false,
        })
    }

    fn remove(&self) -> Result<(), FirewallError> {
        self.state().current = None;
        Ok(())
    }
}
