#!/usr/bin/env bash
# ctr-cni.sh WORKDIR NODE_NETNS
#
# Runs a private containerd (Debian's 1.6: libcni 1.1, CNI up to 1.0.0) inside the node network
# namespace NODE_NETNS, in a mount namespace of its own where /etc/cni/net.d and /opt/cni/bin are
# WORKDIR's (ctr --cni reads only those paths), and starts one container with `ctr run --cni`
# on WORKDIR/rootfs: the CNI config in WORKDIR/net.d is the one sluice installs. The container
# prints its addresses and routes; ctr's exit (--rm) runs CNI DEL. Everything lives under
# WORKDIR; containerd is stopped on every exit path. Prints ADDR lines and exits with ctr's code.
# Must run as root; entered with `nsenter --net=... unshare --mount --propagation private`.
set -u -o pipefail
work=$1
[ -d "$work" ] || { echo "no $work" >&2; exit 2; }
mount -t tmpfs sluice-test /etc/cni 2>/dev/null || { mkdir -p /etc/cni && mount -t tmpfs sluice-test /etc/cni; }
# /opt is the host's: a tmpfs over it here, so that making /opt/cni/bin makes nothing there.
mount -t tmpfs sluice-test /opt
mkdir -p /etc/cni/net.d /opt/cni/bin
cp "$work"/net.d/* /etc/cni/net.d/
mount --bind "$work/bin" /opt/cni/bin
containerd --config "$work/containerd.toml" > "$work/containerd.log" 2>&1 &
cpid=$!
echo "$cpid" > "$work/containerd.pid"
trap 'kill "$cpid" 2>/dev/null; wait "$cpid" 2>/dev/null' EXIT
for _ in $(seq 1 100); do [ -S "$work/containerd.sock" ] && break; sleep 0.1; done
[ -S "$work/containerd.sock" ] || { echo "containerd did not start:" >&2; tail -20 "$work/containerd.log" >&2; exit 3; }
timeout 60 ctr --address "$work/containerd.sock" run --rm --rootfs --cni "$work/rootfs" "$2" \
    /bin/sh -c 'ip -4 -o addr show dev eth0 | sed "s/^/ADDR /"; ip -4 route | sed "s/^/ROUTE /"'
