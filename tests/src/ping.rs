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
