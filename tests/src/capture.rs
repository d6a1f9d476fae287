//! A tcpdump on a link inside a namespace the test made, stopped (and its file read) on drop.

use crate::eventually;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Capture {
    child: Child,
    file: tempfile::NamedTempFile,
}

impl Capture {
    /// Captures on `link` of `netns` what `filter` (tcpdump's syntax) selects.
    pub fn start(netns: &str, link: &str, filter: &str) -> Self {
        let file = tempfile::NamedTempFile::new().expect("a temporary file");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "tcpdump",
                "--immediate-mode",
                "-i",
                link,
                "-n",
                "-U",
                "-w",
            ])
            .arg(file.path())
            .arg(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump (apt-get install tcpdump)");
        // tcpdump writes the file header once it listens.
        assert!(
            eventually(Duration::from_secs(5), || {
                std::fs::metadata(file.path()).is_ok_and(|m| m.len() > 0)
            }),
            "tcpdump did not start on {netns}/{link}"
        );
        Self { child, file }
    }

    /// Stops the capture: (one summary line per packet, the packets' bytes as ASCII).
    pub fn finish(mut self) -> (Vec<String>, String) {
        std::thread::sleep(Duration::from_millis(500));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        let read = |extra: &[&str]| {
            let out = Command::new("tcpdump")
                .args(["-n", "-r"])
                .arg(self.file.path())
                .args(extra)
                .output()
                .expect("tcpdump -r");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let lines = read(&[]).lines().map(str::to_string).collect();
        (lines, read(&["-A"]))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
