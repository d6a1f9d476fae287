//! The lab pod's workload and the tools to test it: `sluice lab serve` answers on every
//! containerPort with the pod's `namespace/name`; `sluice lab probe` connects from inside a pod
//! and says whether that answer came; `sluice lab exec` runs a command in a pod's namespace.

use anyhow::{bail, Context, Result};
use nix::sys::socket::{
    bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockProtocol,
    SockType, SockaddrIn, SockaddrIn6,
};
use std::io::{Read, Write};
use std::net::{
    Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream, UdpSocket,
};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn parse_k8s(p: Option<&str>) -> Option<Self> {
        match p.unwrap_or("TCP") {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }
}

/// Exit code of a probe that could not even try: the kernel has no SCTP.
pub const EXIT_SCTP_UNSUPPORTED: u8 = 2;

/// An SCTP one-to-one socket (`SOCK_STREAM`), which std reads and writes like TCP; `None` when
/// the kernel has no SCTP.
fn sctp_socket() -> Result<Option<std::os::fd::OwnedFd>> {
    match socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Sctp,
    ) {
        Ok(fd) => Ok(Some(fd)),
        Err(
            nix::Error::EPROTONOSUPPORT | nix::Error::ESOCKTNOSUPPORT | nix::Error::EAFNOSUPPORT,
        ) => Ok(None),
        Err(e) => Err(e).context("creating an SCTP socket"),
    }
}

/// A socket bound to `[::]:port` for IPv6 only (the IPv4 one serves IPv4, so peers show as
/// themselves in the log), listening if a stream; None where the pod has no IPv6.
fn ipv6_socket(kind: SockType, port: u16) -> Option<std::os::fd::OwnedFd> {
    let fd = socket(AddressFamily::Inet6, kind, SockFlag::SOCK_CLOEXEC, None).ok()?;
    setsockopt(&fd, sockopt::Ipv6V6Only, &true).ok()?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).ok()?;
    let any = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &any).ok()?;
    if kind == SockType::Stream {
        listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN)).ok()?;
    }
    Some(fd)
}

/// One line of the pod's log, on stderr (the pod's log file) in the CRI log format a kubelet
/// writes, so that `kubectl logs` shows it with its time.
fn log_line(text: &str) {
    let now = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.9fZ");
    eprintln!("{now} stderr F {text}");
}

/// Serves `identity` on each port until killed. Runs in the pod's network namespace.
pub fn serve(identity: &str, ports: &[(Protocol, u16)]) -> Result<()> {
    let answer = format!("{identity}\n");
    let mut threads = Vec::new();
    for &(proto, port) in ports {
        let answer = answer.clone();
        let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        match proto {
            Protocol::Tcp => {
                let l = TcpListener::bind(any).with_context(|| format!("tcp/{port}"))?;
                let what = format!("tcp/{port}");
                if let Some(fd) = ipv6_socket(SockType::Stream, port) {
                    let (answer, what) = (answer.clone(), what.clone());
                    let l6 = TcpListener::from(fd);
                    threads.push(std::thread::spawn(move || stream_loop(l6, &answer, &what)));
                }
                threads.push(std::thread::spawn(move || stream_loop(l, &answer, &what)));
            }
            Protocol::Sctp => {
                let Some(fd) = sctp_socket()? else {
                    log_line(&format!(
                        "sctp/{port}: this kernel has no SCTP; not serving it"
                    ));
                    continue;
                };
                bind(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
                )
                .with_context(|| format!("sctp/{port}"))?;
                listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN))?;
                let l = TcpListener::from(fd);
                let what = format!("sctp/{port}");
                threads.push(std::thread::spawn(move || stream_loop(l, &answer, &what)));
            }
            Protocol::Udp => {
                let s = UdpSocket::bind(any).with_context(|| format!("udp/{port}"))?;
                if let Some(fd) = ipv6_socket(SockType::Datagram, port) {
                    let answer = answer.clone();
                    let s6 = UdpSocket::from(fd);
                    threads.push(std::thread::spawn(move || {
                        let mut buf = [0u8; 512];
                        loop {
                            if let Ok((_, from)) = s6.recv_from(&mut buf) {
                                let _ = s6.send_to(answer.as_bytes(), from);
                                log_line(&format!("udp/{port}: answered {from}"));
                            }
                        }
                    }));
                }
                threads.push(std::thread::spawn(move || {
                    let mut buf = [0u8; 512];
                    loop {
                        if let Ok((_, from)) = s.recv_from(&mut buf) {
                            let _ = s.send_to(answer.as_bytes(), from);
                            log_line(&format!("udp/{port}: answered {from}"));
                        }
                    }
                }));
            }
        }
        log_line(&format!("{identity}: serving {proto:?}/{port}"));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Answers each connection on `l`; `what` (`tcp/80`) names the port in the log.
fn stream_loop(l: TcpListener, answer: &str, what: &str) {
    for mut s in l.incoming().flatten() {
        let _ = s.write_all(answer.as_bytes());
        match s.peer_addr() {
            Ok(peer) => log_line(&format!("{what}: answered {peer}")),
            Err(_) => log_line(&format!("{what}: answered")),
        }
    }
}

/// What a probe found.
#[derive(Debug, PartialEq, Eq)]
pub enum ProbeResult {
    Answered(String),
    NoAnswer(String),
    SctpUnsupported,
}

/// Connects to `to` (from the calling thread's namespace) and reads the server's answer.
pub fn probe(to: SocketAddr, proto: Protocol, timeout: Duration) -> ProbeResult {
    let read_answer = |mut s: TcpStream| -> ProbeResult {
        let _ = s.set_read_timeout(Some(timeout));
        let mut out = String::new();
        match s.read_to_string(&mut out) {
            Ok(_) if !out.is_empty() => ProbeResult::Answered(out.trim().to_string()),
            Ok(_) => ProbeResult::NoAnswer("connected, but no answer".into()),
            Err(e) => ProbeResult::NoAnswer(format!("reading: {e}")),
        }
    };
    match proto {
        Protocol::Tcp => match TcpStream::connect_timeout(&to, timeout) {
            Ok(s) => read_answer(s),
            Err(e) => ProbeResult::NoAnswer(format!("connecting: {e}")),
        },
        Protocol::Sctp => {
            let SocketAddr::V4(to) = to else {
                return ProbeResult::NoAnswer("SCTP probes are IPv4 only so far".into());
            };
            let fd = match sctp_socket() {
                Ok(Some(fd)) => fd,
                Ok(None) => return ProbeResult::SctpUnsupported,
                Err(e) => return ProbeResult::NoAnswer(format!("{e:#}")),
            };
            // A blocking connect bounded by SO_SNDTIMEO.
            let stream = TcpStream::from(fd);
            let _ = stream.set_write_timeout(Some(timeout));
            match nix::sys::socket::connect(
                std::os::fd::AsRawFd::as_raw_fd(&stream),
                &SockaddrIn::from(to),
            ) {
                Ok(()) => read_answer(stream),
                Err(e) => ProbeResult::NoAnswer(format!("connecting: {e}")),
            }
        }
        Protocol::Udp => {
            let attempt = || -> std::io::Result<String> {
                let s = match to {
                    SocketAddr::V4(_) => UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?,
                    SocketAddr::V6(_) => UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?,
                };
                s.connect(to)?;
                // Three tries within the timeout: a first datagram may be lost to ARP.
                let per_try = timeout / 3;
                s.set_read_timeout(Some(per_try.max(Duration::from_millis(10))))?;
                let mut buf = [0u8; 512];
                let mut last = std::io::Error::other("no answer");
                for _ in 0..3 {
                    s.send(b"probe")?;
                    match s.recv(&mut buf) {
                        Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string()),
                        Err(e) => last = e,
                    }
                }
                Err(last)
            };
            match attempt() {
                Ok(a) if !a.is_empty() => ProbeResult::Answered(a),
                Ok(_) => ProbeResult::NoAnswer("empty answer".into()),
                Err(e) => ProbeResult::NoAnswer(format!("udp: {e}")),
            }
        }
    }
}

/// Parses `namespace/name`.
pub fn pod_ref(s: &str) -> Result<(String, String)> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.into(), name.into()))
        }
        _ => bail!("{s:?}: expected namespace/pod"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_refs() {
        assert_eq!(pod_ref("x/a").unwrap(), ("x".into(), "a".into()));
        for bad in ["a", "/a", "x/", "x/a/b", ""] {
            assert!(pod_ref(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn protocols_default_to_tcp() {
        assert_eq!(Protocol::parse_k8s(None), Some(Protocol::Tcp));
        assert_eq!(Protocol::parse_k8s(Some("SCTP")), Some(Protocol::Sctp));
        assert_eq!(Protocol::parse_k8s(Some("ICMP")), None);
    }

    #[test]
    fn loopback_tcp_and_udp_probe() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let SocketAddr::V4(taddr) = tcp.local_addr().unwrap() else {
            panic!()
        };
        std::thread::spawn(move || stream_loop(tcp, "x/a\n", "tcp/test"));
        assert_eq!(
            probe(taddr.into(), Protocol::Tcp, Duration::from_secs(2)),
            ProbeResult::Answered("x/a".into())
        );
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let SocketAddr::V4(uaddr) = udp.local_addr().unwrap() else {
            panic!()
        };
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            if let Ok((_, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(b"x/b\n", from);
            }
        });
        assert_eq!(
            probe(uaddr.into(), Protocol::Udp, Duration::from_secs(2)),
            ProbeResult::Answered("x/b".into())
        );
        // Nobody listens on a port just freed.
        let gone = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let SocketAddr::V4(gone) = gone else { panic!() };
        assert!(matches!(
            probe(gone.into(), Protocol::Tcp, Duration::from_millis(500)),
            ProbeResult::NoAnswer(_)
        ));
    }

    #[test]
    fn ipv6_loopback_tcp_and_udp_probe() {
        let Some(fd) = ipv6_socket(SockType::Stream, 0) else {
            eprintln!("no IPv6 here; skipped");
            return;
        };
        let tcp = TcpListener::from(fd);
        let port = tcp.local_addr().unwrap().port();
        std::thread::spawn(move || stream_loop(tcp, "x/6\n", "tcp/test"));
        let to = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
        assert_eq!(
            probe(to, Protocol::Tcp, Duration::from_secs(2)),
            ProbeResult::Answered("x/6".into())
        );
        let udp = UdpSocket::from(ipv6_socket(SockType::Datagram, 0).unwrap());
        let uport = udp.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            if let Ok((_, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(b"x/u6\n", from);
            }
        });
        assert_eq!(
            probe(
                SocketAddr::from((Ipv6Addr::LOCALHOST, uport)),
                Protocol::Udp,
                Duration::from_secs(2)
            ),
            ProbeResult::Answered("x/u6".into())
        );
        // The IPv6 socket is IPv6 only: IPv4 on its port finds nobody.
        assert!(matches!(
            probe(
                SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                Protocol::Tcp,
                Duration::from_millis(500)
            ),
            ProbeResult::NoAnswer(_)
        ));
    }
}
