# The sluice image: the static binary plus the netfilter tools the agent calls (nft, iptables,
# ipset, conntrack). Build the binary first: `cargo dist` (x86_64-unknown-linux-musl, LTO).
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iptables ipset conntrack \
 && rm -rf /var/lib/apt/lists/*
COPY target/x86_64-unknown-linux-musl/release/sluice /usr/local/bin/sluice
ENTRYPOINT ["/usr/local/bin/sluice"]
