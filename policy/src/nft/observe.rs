//! The hash of sluice's table read straight from the kernel: one netlink dump of the rules of
//! chain `state` (NFT_MSG_GETRULE filtered by table and chain), where `nft list chain` would
//! first load the whole table into its cache (tens of milliseconds at a thousand pods).

use super::{HASH_MARK, STATE_CHAIN, TABLE};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::nftables::{NfTablesMessage, RuleAttribute, RuleMessage};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use std::io;

/// nftnl's user data type of a rule comment.
const UDATA_RULE_COMMENT: u8 = 0;
/// Messages read at most: the chain holds one rule.
const MAX_READS: usize = 64;

/// The comment in a rule's user data (TLVs: type, length, value; the value NUL-terminated).
pub fn rule_comment(udata: &[u8]) -> Option<String> {
    let mut rest = udata;
    while let [kind, len, tail @ ..] = rest {
        let value = tail.get(..usize::from(*len))?;
        if *kind == UDATA_RULE_COMMENT {
            let text = value.split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        rest = &tail[usize::from(*len)..];
    }
    None
}

/// The hash carried by chain `state` of sluice's table in `netns` (the caller's when `None`);
/// `None` when the table or the chain is absent.
pub fn state_hash(netns: Option<&str>) -> io::Result<Option<String>> {
    match netns {
        None => query(),
        Some(name) => {
            let path = std::path::Path::new("/run/netns").join(name);
            std::thread::scope(|s| {
                s.spawn(|| {
                    let file = std::fs::File::open(&path)?;
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(io::Error::from)?;
                    query()
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the netns thread panicked")))
            })
        }
    }
}

fn query() -> io::Result<Option<String>> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut msg = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
            NfTablesMessage::GetRule(RuleMessage {
                attributes: vec![
                    RuleAttribute::Table(TABLE.into()),
                    RuleAttribute::Chain(STATE_CHAIN.into()),
                ],
            }),
        )),
    );
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut found = None;
    for _ in 0..MAX_READS {
        let (data, _) = socket.recv_from_full()?;
        let mut at = 0;
        while at < data.len() {
            let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&data[at..])
                .map_err(|e| io::Error::other(e.to_string()))?;
            let len = msg.header.length as usize;
            if len == 0 {
                return Err(io::Error::other("a netlink message of length 0"));
            }
            at += len;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(found),
                NetlinkPayload::Error(e) => {
                    return match e.code.map(|c| -c.get()) {
                        None => Ok(found),
                        Some(nix::libc::ENOENT) => Ok(None),
                        Some(code) => Err(io::Error::from_raw_os_error(code)),
                    };
                }
                NetlinkPayload::InnerMessage(NetfilterMessage {
                    inner: NetfilterMessageInner::NfTables(NfTablesMessage::NewRule(rule)),
                    ..
                }) => {
                    let comment = rule.attributes.iter().find_map(|a| match a {
                        RuleAttribute::UserData(u) => rule_comment(u),
                        _ => None,
                    });
                    if let Some(hash) =
                        comment.and_then(|c| c.strip_prefix(HASH_MARK).map(str::to_string))
                    {
                        found = Some(hash);
                    }
                }
                _ => {}
            }
        }
    }
    Err(io::Error::other("no end to the rule dump"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comment_is_read_from_user_data() {
        let mut u = vec![UDATA_RULE_COMMENT, 6];
        u.extend_from_slice(b"hello\0");
        assert_eq!(rule_comment(&u).as_deref(), Some("hello"));
        // Another TLV first, then the comment.
        let mut v = vec![7, 2, 1, 2, UDATA_RULE_COMMENT, 3, b'a', b'b', 0];
        assert_eq!(rule_comment(&v).as_deref(), Some("ab"));
        v.truncate(6);
        assert_eq!(rule_comment(&v), None, "a value cut short");
        assert_eq!(rule_comment(&[]), None);
        assert_eq!(rule_comment(&[1, 1, 0]), None);
    }
}
