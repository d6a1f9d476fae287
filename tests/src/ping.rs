//! A continuous ping from inside a namespace the test made, for measuring loss across a change.

use crate::lab::in_netns;
use std::process::{Command, Output};
use std::thread::JoinHandle;

/// `count` pings `interval` seconds apart (ping's `-i`, e.g. "0.02"), each waited for at most a
/// second, running on a thread of their own.
pub struct Pinger {
    count: u32,
    thread: JoinHandle<Output>,
}

impl Pinger {
    pub fn start(netns: &str, dst: &str, count: u32, interval: &str) -> Self {
        let (netns, dst, interval) = (netns.to_string(), dst.to_string(), interval.to_string());
        let n = count.to_string();
        let thread = std::thread::spawn(move || {
            in_netns(&netns, move || {
                Command::new("ping")
                    .args(["-c", &n, "-i", &interval, "-W", "1", "-q", &dst])
                    .output()
                    .expect("ping (apt-get install iputils-ping)")
            })
        });
        Self { count, thread }
    }

    /// Waits for the last ping: (how many were lost, ping's summary).
    pub fn lost(self) -> (u32, String) {
        let out = self.thread.join().expect("the ping thread panicked");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let received: u32 = text
            .split(", ")
            .find_map(|p| p.strip_suffix(" received")?.parse().ok())
            .unwrap_or_else(|| panic!("no ping summary:\n{text}"));
        (self.count.saturating_sub(received), text)
    }
}

/// A ping that runs until stopped (iputils' `ping -D`, every reply stamped), from inside the
/// network namespace at a path (a pod's `/proc/PID/ns/net`), for measuring the loss across one
/// change: which sequence numbers went unanswered.
pub struct PingStream {
    child: std::process::Child,
    interval_ms: u32,
    /// Reads ping's stdout as it comes (a pipe left unread would stall it).
    reader: Option<JoinHandle<String>>,
}

/// What a stopped [`PingStream`] saw.
#[derive(Debug)]
pub struct StreamLoss {
    /// Echo requests sent (the last, possibly still in flight when stopped, not counted).
    pub sent: u32,
    pub lost: u32,
    /// The longest run of consecutive unanswered requests, in milliseconds of sending.
    pub longest_gap_ms: u32,
    pub interval_ms: u32,
    pub output: String,
}

impl StreamLoss {
    /// The loss in milliseconds of sending (lost requests times the interval).
    pub fn lost_ms(&self) -> u32 {
        self.lost * self.interval_ms
    }
}

impl PingStream {
    /// Pings `dst` every `interval_ms` from the namespace at `netns`, the padding filled with
    /// `pattern` (hex, ping's `-p`), each reply waited for at most a second.
    pub fn start(netns: &std::path::Path, dst: &str, interval_ms: u32, pattern: &str) -> Self {
        let interval = format!("{:.3}", f64::from(interval_ms) / 1000.0);
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args([
                "ping", "-D", "-n", "-W", "1", "-i", &interval, "-p", pattern, dst,
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nsenter and ping (apt-get install util-linux iputils-ping)");
        let mut stdout = child.stdout.take().expect("ping's stdout");
        let reader = std::thread::spawn(move || {
            use std::io::Read as _;
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        });
        Self {
            child,
            interval_ms,
            reader: Some(reader),
        }
    }

    /// Stops the ping (SIGINT, by its PID: it prints its summary) and counts what was lost.
    pub fn stop(mut self) -> StreamLoss {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        let text = self
            .reader
            .take()
            .and_then(|r| r.join().ok())
            .unwrap_or_default();
        stream_loss(&text, self.interval_ms)
    }
}

/// What iputils' `ping` printed (reply lines with `icmp_seq=N`, then its summary), the requests
/// sent `interval_ms` apart: which were lost. The last request sent is not counted (it may
/// have been in flight when ping was stopped).
pub fn stream_loss(text: &str, interval_ms: u32) -> StreamLoss {
    let transmitted: u32 = text
        .lines()
        .find_map(|l| l.split(" packets transmitted").next()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ping summary:\n{text}"));
    let answered: std::collections::BTreeSet<u32> = text
        .lines()
        .filter(|l| l.contains(" bytes from ") && !l.contains("DUP!"))
        .filter_map(|l| {
            l.split("icmp_seq=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let sent = transmitted.saturating_sub(1);
    let (mut lost, mut run, mut longest) = (0, 0, 0);
    for seq in 1..=sent {
        if answered.contains(&seq) {
            run = 0;
        } else {
            lost += 1;
            run += 1;
            longest = longest.max(run);
        }
    }
    StreamLoss {
        sent,
        lost,
        longest_gap_ms: longest * interval_ms,
        interval_ms,
        output: text.to_string(),
    }
}

impl Drop for PingStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::stream_loss;

    #[test]
    fn loss_counts_the_unanswered_sequence_numbers_and_the_longest_gap() {
        let text = "PING 10.244.1.5 (10.244.1.5) 56(84) bytes of data.\n\
            [1.000] 64 bytes from 10.244.1.5: icmp_seq=1 ttl=62 time=0.5 ms\n\
            [1.060] 64 bytes from 10.244.1.5: icmp_seq=4 ttl=62 time=0.5 ms\n\
            [1.060] 64 bytes from 10.244.1.5: icmp_seq=4 ttl=62 time=0.6 ms (DUP!)\n\
            [1.100] 64 bytes from 10.244.1.5: icmp_seq=6 ttl=62 time=0.5 ms\n\
            \n--- 10.244.1.5 ping statistics ---\n\
            8 packets transmitted, 3 received, 62.5% packet loss, time 140ms\n";
        let loss = stream_loss(text, 20);
        // 1..=7 counted (8 may have been in flight): 2, 3, 5, 7 lost; 2-3 the longest run.
        assert_eq!((loss.sent, loss.lost), (7, 4));
        assert_eq!(loss.lost_ms(), 80);
        assert_eq!(loss.longest_gap_ms, 40);
    }
}
