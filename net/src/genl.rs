//! A blocking generic-netlink socket bound to one family (ethtool, wireguard), in the network
//! namespace of the thread that made it: the family is resolved once, then each request is sent
//! and its answers read until the kernel's ACK or DONE.

use netlink_packet_core::{
    DecodeError, Emitable, NetlinkDeserializable, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable, NLM_F_REQUEST,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlMessage};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

#[derive(Debug, thiserror::Error)]
pub enum GenlError {
    #[error("opening a generic netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("decoding the kernel's answer to {op}: {source}")]
    Decode {
        op: &'static str,
        #[source]
        source: DecodeError,
    },
    #[error("the kernel has no {0} generic netlink family")]
    NoFamily(&'static str),
    #[error("{op}: {source}")]
    Kernel {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl GenlError {
    /// The kernel's errno, when the kernel refused.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

pub struct GenlSocket {
    socket: Socket,
    family: u16,
    seq: u32,
}

impl GenlSocket {
    /// Opens a socket and resolves `family` (an error if the kernel does not have it).
    pub fn connect(family: &'static str) -> Result<Self, GenlError> {
        let mut socket = Socket::new(NETLINK_GENERIC).map_err(GenlError::Socket)?;
        socket.bind_auto().map_err(GenlError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(GenlError::Socket)?;
        let mut me = Self {
            socket,
            family: 0,
            seq: 0,
        };
        let ask = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(family.into())],
        });
        let answers: Vec<GenlMessage<GenlCtrl>> = me
            .request(ask, NLM_F_REQUEST, "resolving a generic netlink family")
            .map_err(|e| match e.errno() {
                Some(nix::libc::ENOENT) => GenlError::NoFamily(family),
                _ => e,
            })?;
        me.family = answers
            .iter()
            .flat_map(|a| a.payload.nlas.iter())
            .find_map(|a| match a {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            })
            .ok_or(GenlError::NoFamily(family))?;
        Ok(me)
    }

    /// Sends one request and reads its answers: every message of `R` until the ACK or the end of
    /// a dump. A kernel error comes back as [`GenlError::Kernel`].
    pub fn request<F, R>(
        &mut self,
        mut msg: GenlMessage<F>,
        flags: u16,
        op: &'static str,
    ) -> Result<Vec<R>, GenlError>
    where
        F: GenlFamily + Emitable + std::fmt::Debug,
        GenlMessage<F>: NetlinkSerializable,
        R: NetlinkDeserializable + std::fmt::Debug,
    {
        msg.finalize();
        msg.set_resolved_family_id(self.family);
        let mut nl = NetlinkMessage::from(msg);
        self.seq = self.seq.wrapping_add(1);
        nl.header.flags = flags;
        nl.header.sequence_number = self.seq;
        nl.finalize();
        let mut buf = vec![0; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.socket
            .send(&buf, 0)
            .map_err(|source| GenlError::Io { op, source })?;
        let dump = flags & netlink_packet_core::NLM_F_DUMP == netlink_packet_core::NLM_F_DUMP;
        let mut out = Vec::new();
        loop {
            let (data, _) = self
                .socket
                .recv_from_full()
                .map_err(|source| GenlError::Io { op, source })?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<R>::deserialize(&data[offset..])
                    .map_err(|source| GenlError::Decode { op, source })?;
                let len = reply.header.length as usize;
                let seq = reply.header.sequence_number;
                offset += len.max(1).next_multiple_of(4);
                if seq != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::InnerMessage(m) => {
                        out.push(m);
                        // Without ACK or DUMP a single answer is all there is.
                        if !dump && flags & netlink_packet_core::NLM_F_ACK == 0 {
                            return Ok(out);
                        }
                    }
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(code) => Err(GenlError::Kernel {
                                op,
                                source: std::io::Error::from_raw_os_error(-code.get()),
                            }),
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(out),
                    _ => {}
                }
            }
        }
    }
}
