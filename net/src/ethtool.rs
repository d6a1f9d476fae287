//! Device offload features over the ethtool generic-netlink family (`ethtool -k` / `-K`
//! without the tool, and without the `SIOCETHTOOL` ioctl, which would need `unsafe`).
//!
//! The `ethtool` crate of the rust-netlink project only reads features (its setter is a
//! `todo!()` in 0.3), so the two messages sluice needs are built here on
//! `netlink-packet-generic`: `ETHTOOL_MSG_FEATURES_GET` and `ETHTOOL_MSG_FEATURES_SET`, with
//! bitsets in their verbose (by name) form.

use crate::genl::{GenlError, GenlSocket};
use netlink_packet_core::{
    DecodeError, Emitable, NetlinkDeserializable, NetlinkSerializable, NlasIterator,
    ParseableParametrized, NLM_F_ACK, NLM_F_REQUEST,
};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use std::collections::BTreeMap;

/// The features `ethtool -K DEV tx off` switches off.
pub const TX_CHECKSUM_FEATURES: [&str; 5] = [
    "tx-checksum-ipv4",
    "tx-checksum-ip-generic",
    "tx-checksum-ipv6",
    "tx-checksum-fcoe-crc",
    "tx-checksum-sctp",
];

const FAMILY: &str = "ethtool";
const MSG_FEATURES_GET: u8 = 11;
const MSG_FEATURES_SET: u8 = 12;
const A_FEATURES_HEADER: u16 = 1;
const A_FEATURES_WANTED: u16 = 3;
const A_FEATURES_ACTIVE: u16 = 4;
const A_HEADER_DEV_NAME: u16 = 2;
const A_HEADER_FLAGS: u16 = 3;
const FLAG_OMIT_REPLY: u32 = 1 << 1;
const A_BITSET_NOMASK: u16 = 1;
const A_BITSET_BITS: u16 = 3;
const A_BITSET_BITS_BIT: u16 = 1;
const A_BITSET_BIT_NAME: u16 = 2;
const A_BITSET_BIT_VALUE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;

#[derive(Debug, thiserror::Error)]
pub enum EthtoolError {
    #[error(transparent)]
    Genl(GenlError),
    #[error("decoding the kernel's answer to {op}: {source}")]
    Decode {
        op: &'static str,
        #[source]
        source: DecodeError,
    },
    #[error("the kernel has no ethtool netlink family")]
    NoFamily,
    #[error("{op} {ifname}: {source}")]
    Kernel {
        op: &'static str,
        ifname: String,
        #[source]
        source: std::io::Error,
    },
}

/// An ethtool message: command and raw attributes.
#[derive(Debug, Clone)]
struct EthtoolMsg {
    cmd: u8,
    attrs: Vec<u8>,
}

impl GenlFamily for EthtoolMsg {
    fn family_name() -> &'static str {
        FAMILY
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        1
    }
}

impl Emitable for EthtoolMsg {
    fn buffer_len(&self) -> usize {
        self.attrs.len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        buffer[..self.attrs.len()].copy_from_slice(&self.attrs);
    }
}

impl ParseableParametrized<[u8], GenlHeader> for EthtoolMsg {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        Ok(Self {
            cmd: header.cmd,
            attrs: buf.to_vec(),
        })
    }
}

/// One netlink attribute, padded to 4 bytes.
fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut out = Vec::with_capacity(len.next_multiple_of(4));
    out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(len.next_multiple_of(4), 0);
    out
}

fn nested(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
    nla(kind | NLA_F_NESTED, &parts.concat())
}

fn header(ifname: &str, flags: u32) -> Vec<u8> {
    let mut name = ifname.as_bytes().to_vec();
    name.push(0);
    nested(
        A_FEATURES_HEADER,
        &[
            nla(A_HEADER_DEV_NAME, &name),
            nla(A_HEADER_FLAGS, &flags.to_ne_bytes()),
        ],
    )
}

/// A generic netlink socket to the ethtool family, in the namespace of the thread that made it.
pub struct Ethtool {
    genl: GenlSocket,
}

impl Ethtool {
    pub fn connect() -> Result<Self, EthtoolError> {
        let genl = GenlSocket::connect(FAMILY).map_err(|e| match e {
            GenlError::NoFamily(_) => EthtoolError::NoFamily,
            other => EthtoolError::Genl(other),
        })?;
        Ok(Self { genl })
    }

    /// Sends one request and reads until its answer: the first message of `R`, or the ACK
    /// (`None`). A kernel error comes back as [`EthtoolError::Kernel`].
    fn exchange<F, R>(
        &mut self,
        msg: GenlMessage<F>,
        flags: u16,
        op: &'static str,
        ifname: &str,
    ) -> Result<Option<R>, EthtoolError>
    where
        F: GenlFamily + Emitable + std::fmt::Debug,
        GenlMessage<F>: NetlinkSerializable,
        R: NetlinkDeserializable + std::fmt::Debug,
    {
        match self.genl.request(msg, flags, op) {
            Ok(answers) => Ok(answers.into_iter().next()),
            Err(GenlError::Kernel { op, source }) => Err(EthtoolError::Kernel {
                op,
                ifname: ifname.into(),
                source,
            }),
            Err(other) => Err(EthtoolError::Genl(other)),
        }
    }

    /// The active features of `ifname`, by name.
    pub fn features(&mut self, ifname: &str) -> Result<BTreeMap<String, bool>, EthtoolError> {
        let op = "reading features of";
        let ask = GenlMessage::from_payload(EthtoolMsg {
            cmd: MSG_FEATURES_GET,
            attrs: header(ifname, 0),
        });
        let Some(reply): Option<GenlMessage<EthtoolMsg>> =
            self.exchange(ask, NLM_F_REQUEST, op, ifname)?
        else {
            return Ok(BTreeMap::new());
        };
        let decode = |source| EthtoolError::Decode { op, source };
        let mut out = BTreeMap::new();
        for attr in NlasIterator::new(&reply.payload.attrs[..]) {
            let attr = attr.map_err(decode)?;
            if attr.kind() != A_FEATURES_ACTIVE {
                continue;
            }
            // Without a mask (the kernel's form for "active") only the bits that are set are
            // listed, and without a value flag.
            let mut nomask = false;
            for part in NlasIterator::new(attr.value()) {
                if part.map_err(decode)?.kind() == A_BITSET_NOMASK {
                    nomask = true;
                }
            }
            for part in NlasIterator::new(attr.value()) {
                let part = part.map_err(decode)?;
                if part.kind() != A_BITSET_BITS {
                    continue;
                }
                for bit in NlasIterator::new(part.value()) {
                    let bit = bit.map_err(decode)?;
                    if bit.kind() != A_BITSET_BITS_BIT {
                        continue;
                    }
                    let mut name = None;
                    let mut on = nomask;
                    for field in NlasIterator::new(bit.value()) {
                        let field = field.map_err(decode)?;
                        match field.kind() {
                            A_BITSET_BIT_NAME => {
                                let raw = field.value();
                                let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
                                name = Some(String::from_utf8_lossy(raw).into_owned());
                            }
                            A_BITSET_BIT_VALUE => on = true,
                            _ => {}
                        }
                    }
                    if let Some(name) = name {
                        out.insert(name, on);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Sets the named features of `ifname` on or off; the others are left as they are.
    /// Features the device cannot change are ignored by the kernel.
    pub fn set_features(
        &mut self,
        ifname: &str,
        wanted: &[(&str, bool)],
    ) -> Result<(), EthtoolError> {
        let bits: Vec<Vec<u8>> = wanted
            .iter()
            .map(|(name, on)| {
                let mut n = name.as_bytes().to_vec();
                n.push(0);
                let mut fields = vec![nla(A_BITSET_BIT_NAME, &n)];
                if *on {
                    fields.push(nla(A_BITSET_BIT_VALUE, &[]));
                }
                nested(A_BITSET_BITS_BIT, &fields)
            })
            .collect();
        let attrs = [
            header(ifname, FLAG_OMIT_REPLY),
            nested(A_FEATURES_WANTED, &[nested(A_BITSET_BITS, &bits)]),
        ]
        .concat();
        let ask = GenlMessage::from_payload(EthtoolMsg {
            cmd: MSG_FEATURES_SET,
            attrs,
        });
        self.exchange::<_, GenlMessage<EthtoolMsg>>(
            ask,
            NLM_F_REQUEST | NLM_F_ACK,
            "setting features of",
            ifname,
        )
        .map(|_| ())
    }

    /// Switches TX checksum offload on or off (`ethtool -K DEV tx on|off`).
    pub fn set_tx_checksum(&mut self, ifname: &str, on: bool) -> Result<(), EthtoolError> {
        let wanted: Vec<(&str, bool)> = TX_CHECKSUM_FEATURES.iter().map(|f| (*f, on)).collect();
        self.set_features(ifname, &wanted)
    }

    /// Whether any TX checksum offload is on.
    pub fn tx_checksum(&mut self, ifname: &str) -> Result<bool, EthtoolError> {
        let features = self.features(ifname)?;
        Ok(TX_CHECKSUM_FEATURES
            .iter()
            .any(|f| features.get(*f).copied().unwrap_or(false)))
    }
}
