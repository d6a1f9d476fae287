//! What the benchmark binaries share: cleanup that runs on every exit path (guards dropped on
//! return and panic, and the same actions on SIGINT, SIGTERM and SIGHUP), namespaces made
//! under such guards, a bare HTTP client for the API, the figures' formatting, and the command
//! line.

use crate::lab::in_netns;
use crate::{run, sh, unique};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::channel;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use std::time::Instant;

/// A bench's command line: `--flag value` pairs and `--help`. A bad one prints the reason and
/// the usage and exits with status 2, as command-line tools do, rather than panicking.
pub struct Flags {
    tool: &'static str,
    usage: &'static str,
    args: std::vec::IntoIter<String>,
}

impl Flags {
    pub fn from_env(tool: &'static str, usage: &'static str) -> Self {
        Flags {
            tool,
            usage,
            args: std::env::args().skip(1).collect::<Vec<_>>().into_iter(),
        }
    }

    /// The next flag and its value, or `None` at the end. `--help` prints the usage and exits.
    pub fn next_pair(&mut self) -> Option<(String, String)> {
        let flag = self.args.next()?;
        if flag == "--help" || flag == "-h" {
            println!("{}", self.usage);
            std::process::exit(0);
        }
        match self.args.next() {
            Some(value) => Some((flag, value)),
            None => self.fail(&format!("{flag} needs a value")),
        }
    }

    pub fn number<T: std::str::FromStr>(&self, flag: &str, value: &str) -> T {
        value
            .parse()
            .unwrap_or_else(|_| self.fail(&format!("{flag} takes a number, not {value:?}")))
    }

    /// Fails unless `ok`: the usage, `why`, exit status 2.
    pub fn require(&self, ok: bool, why: &str) {
        if !ok {
            self.fail(why);
        }
    }

    pub fn fail(&self, why: &str) -> ! {
        eprintln!("{}: {why}\n\n{}", self.tool, self.usage);
        std::process::exit(2)
    }
}

type Action = Box<dyn FnOnce() + Send>;
static CLEANUPS: Mutex<Vec<(usize, Action)>> = Mutex::new(Vec::new());
static NEXT_GUARD: AtomicUsize = AtomicUsize::new(0);

fn cleanups() -> MutexGuard<'static, Vec<(usize, Action)>> {
    CLEANUPS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs its action once: when dropped (on return or panic), or from the signal thread.
pub struct Guard(usize);

impl Guard {
    pub fn new(action: impl FnOnce() + Send + 'static) -> Self {
        let id = NEXT_GUARD.fetch_add(1, Ordering::Relaxed);
        cleanups().push((id, Box::new(action)));
        Guard(id)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let action = {
            let mut list = cleanups();
            list.iter()
                .position(|(id, _)| *id == self.0)
                .map(|i| list.remove(i).1)
        };
        if let Some(action) = action {
            action();
        }
    }
}

/// On SIGINT, SIGTERM or SIGHUP, one thread runs every pending cleanup, newest first, and exits.
/// The handlers come from tokio's signal driver; the signal mask stays empty, so the children
/// (which inherit it) can still be stopped by `sluice lab agent stop` and friends.
pub fn cleanup_on_signals() {
    use tokio::signal::unix::{signal, SignalKind};
    let (ready_tx, ready) = channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the signal thread");
        rt.block_on(async move {
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
            let _ = ready_tx.send(());
            let (name, code) = tokio::select! {
                _ = int.recv() => ("SIGINT", 130),
                _ = term.recv() => ("SIGTERM", 143),
                _ = hup.recv() => ("SIGHUP", 129),
            };
            eprintln!("{name}; cleaning up");
            let pending: Vec<(usize, Action)> = std::mem::take(&mut *cleanups());
            for (_, action) in pending.into_iter().rev() {
                action();
            }
            std::process::exit(code);
        });
    });
    ready
        .recv_timeout(Duration::from_secs(5))
        .expect("the signal thread did not start");
}

/// A network namespace made here, deleted by its guard.
pub struct Ns {
    pub name: String,
    _guard: Guard,
}

impl Ns {
    pub fn new(tag: &str) -> Self {
        let name = unique(tag);
        let n = name.clone();
        let guard = Guard::new(move || {
            let _ = Command::new("ip").args(["netns", "del", &n]).output();
        });
        sh(&["ip", "netns", "add", &name]);
        ip(&name, "link set lo up");
        Self {
            name,
            _guard: guard,
        }
    }
}

/// `ip -n NS ARGS` (split on spaces), which must succeed.
pub fn ip(ns: &str, args: &str) {
    let mut full = vec!["ip", "-n", ns];
    full.extend(args.split_whitespace());
    sh(&full);
}

/// `ip netns exec NS ARGS...`, which must succeed.
pub fn exec(ns: &str, args: &[&str]) -> String {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    sh(&full)
}

pub fn sysctl(ns: &str, kv: &str) {
    exec(ns, &["sysctl", "-qw", kv]);
}

/// One request; the status code and body.
pub fn http(api: SocketAddr, method: &str, path: &str, ctype: &str, body: &str) -> (u16, String) {
    let mut s =
        TcpStream::connect_timeout(&api, Duration::from_secs(5)).expect("connecting to the API");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_nodelay(true).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {api}\r\nAccept: application/json\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("writing to the API");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("reading the API's answer");
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

/// `VmRSS` and `VmHWM` of `pid`, in MiB.
pub fn rss_mib(pid: i32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// The median of `v` (the mean of the middle two when `v` has an even length); NaN when empty.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => s[n / 2],
        _ => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// A percentile bootstrap interval (`level`, e.g. 0.9) for `median(a) / median(b)`, where
/// `a[i]` and `b[i]` were measured in the same round: rounds are resampled whole, so that drift
/// shared by a round stays paired. Deterministic (fixed seed), so a rerun on the same figures
/// prints the same interval.
pub fn ratio_interval(a: &[f64], b: &[f64], resamples: usize, level: f64) -> (f64, f64) {
    let n = a.len().min(b.len());
    if n == 0 || resamples == 0 {
        return (f64::NAN, f64::NAN);
    }
    // splitmix64: enough to pick indices; not worth a crate.
    let mut state = 0x5eed_u64;
    let mut next_index = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % n as u64) as usize
    };
    let mut ratios = Vec::with_capacity(resamples);
    let (mut ra, mut rb) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..resamples {
        ra.clear();
        rb.clear();
        for _ in 0..n {
            let i = next_index();
            ra.push(a[i]);
            rb.push(b[i]);
        }
        ratios.push(median(&ra) / median(&rb));
    }
    ratios.sort_by(f64::total_cmp);
    let tail = (1.0 - level.clamp(0.0, 1.0)) / 2.0;
    let at = |q: f64| ratios[((q * (resamples - 1) as f64).round() as usize).min(resamples - 1)];
    (at(tail), at(1.0 - tail))
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

// ---------------------------------------------------------------------------------------------
// iperf3.

/// Whether something listens on TCP `port` inside `ns`, polled until `limit`.
pub fn wait_listening(ns: &str, port: u16, limit: Duration) -> bool {
    let ns = ns.to_string();
    let hex = format!(":{port:04X} ");
    in_netns(&ns, move || {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let listening = ["tcp", "tcp6"].iter().any(|f| {
                std::fs::read_to_string(format!("/proc/thread-self/net/{f}"))
                    .unwrap_or_default()
                    .lines()
                    .skip(1)
                    .any(|l| {
                        let cols: Vec<&str> = l.split_whitespace().collect();
                        cols.len() > 3 && format!("{} ", cols[1]).ends_with(&hex) && cols[3] == "0A"
                    })
            });
            if listening {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    })
}

pub const IPERF_PORT: u16 = 5201;

/// An iperf3 server in `ns`, killed by the returned guard.
pub fn iperf_server(ns: &str) -> Guard {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "iperf3", "-s", "-p"])
        .arg(IPERF_PORT.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting iperf3 -s");
    let pid = child.id();
    let guard = Guard::new(move || {
        let _ = child.kill();
        let _ = child.wait();
    });
    assert!(
        wait_listening(ns, IPERF_PORT, Duration::from_secs(5)),
        "iperf3 -s (pid {pid}) in {ns} is not listening"
    );
    guard
}

/// One iperf3 run from `ns` to `server`: received Gbit/s.
pub fn iperf(ns: &str, server: impl Into<std::net::IpAddr>, secs: u32, streams: u32) -> f64 {
    let server: std::net::IpAddr = server.into();
    let mut last = String::new();
    for _attempt in 0..3 {
        let out = run(Command::new("timeout")
            .args(["-k", "5", &(secs + 30).to_string()])
            .args(["ip", "netns", "exec", ns, "iperf3", "-J", "-c"])
            .arg(server.to_string())
            .args(["-p", &IPERF_PORT.to_string()])
            .args(["-t", &secs.to_string(), "-P", &streams.to_string()])
            .args(["--connect-timeout", "3000"]));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
            return bps / 1e9;
        }
        last = format!(
            "{} {}",
            v["error"].as_str().unwrap_or(""),
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    panic!("iperf3 from {ns} to {server} failed 3 times: {last}");
}

/// Runs of a shaped transfer one direction gets before it is called too slow.
pub const SHAPED_RUNS: usize = 3;

/// A shaper holds a transfer to `rate_bps` within 10 %, `measure` giving one run's goodput in
/// bit/s. Going over is the shaper's fault, so every run must stay at or under 110 %; falling short
/// can also be a busy machine starving one TCP flow (CI once measured 89.6 % under load), so the
/// best of up to [`SHAPED_RUNS`] runs must reach 90 %. A shaper holding a wrong rate fails either
/// way. Returns the figures measured, for the caller's report.
pub fn within_ten_percent(what: &str, rate_bps: f64, mut measure: impl FnMut() -> f64) -> Vec<f64> {
    let mut runs = Vec::new();
    for run in 1..=SHAPED_RUNS {
        let bps = measure();
        runs.push(bps);
        eprintln!(
            "{what}, run {run}: {:.2} Mbit/s ({:.1} % of {:.0} Mbit/s)",
            bps / 1e6,
            100.0 * bps / rate_bps,
            rate_bps / 1e6
        );
        assert!(
            bps <= 1.1 * rate_bps,
            "{what}: {:.2} Mbit/s is over {:.0} Mbit/s by more than 10 %",
            bps / 1e6,
            rate_bps / 1e6
        );
        if bps >= 0.9 * rate_bps {
            return runs;
        }
    }
    panic!(
        "{what}: the best of {SHAPED_RUNS} runs, {:.2} Mbit/s, is under {:.0} Mbit/s by more than 10 %",
        runs.iter().cloned().fold(0.0, f64::max) / 1e6,
        rate_bps / 1e6
    );
}

#[cfg(test)]
mod tests {
    use super::{median, ratio_interval};

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn interval_of_a_constant_ratio_is_that_ratio() {
        let b = [30.0, 24.0, 36.0, 31.0, 28.0];
        let a: Vec<f64> = b.iter().map(|x| x * 0.9).collect();
        let (lo, hi) = ratio_interval(&a, &b, 500, 0.9);
        assert!(
            (lo - 0.9).abs() < 1e-9 && (hi - 0.9).abs() < 1e-9,
            "{lo} {hi}"
        );
    }

    #[test]
    fn interval_brackets_the_point_estimate_and_narrows_at_a_lower_level() {
        let b = [27.8, 24.7, 32.1, 31.5, 31.0, 35.2, 33.2, 27.7, 29.3, 27.8];
        let a = [28.2, 29.8, 30.3, 29.7, 31.6, 32.6, 32.5, 31.9, 30.7, 31.1];
        let point = median(&a) / median(&b);
        let (lo, hi) = ratio_interval(&a, &b, 2000, 0.9);
        assert!(lo < point && point < hi, "{lo} {point} {hi}");
        let (lo50, hi50) = ratio_interval(&a, &b, 2000, 0.5);
        assert!(lo <= lo50 && hi50 <= hi && hi50 - lo50 < hi - lo);
        // The same figures give the same interval: the seed is fixed.
        assert_eq!((lo, hi), ratio_interval(&a, &b, 2000, 0.9));
    }
}
