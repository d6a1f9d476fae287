#!/usr/bin/env bash
# two-containers.sh PLUGIN_BIN PLUGIN_TYPE CONFLIST_TEMPLATE
#
# Runs Podman (CNI backend) inside a throw-away "node" network namespace,
# starts two busybox containers on a CNI network whose main plugin is
# PLUGIN_BIN (installed as PLUGIN_TYPE in a private CNI plugin dir), and
# checks that container 1 reaches container 2 (ICMP ping + TCP via busybox nc)
# and back. Exits 0 only if every check passes. Everything it creates carries
# a per-run prefix and is removed on every exit path.
#
# Placeholders substituted in CONFLIST_TEMPLATE (any other @WORD@ left is an error):
#   @NAME@      network name (the conflist "name"; containers use --network @NAME@)
#   @TYPE@      PLUGIN_TYPE
#   @SUBNET@    IPv4 pod subnet (env SUBNET, default 10.88.7.0/24)
#   @IPAM_DIR@  private dir for host-local IPAM state ("dataDir")
#   @WORKDIR@   the per-run temp dir
#   @PREFIX@    the per-run prefix
#   @NODE_NS@   name of the node netns (/run/netns/@NODE_NS@)
#
# Environment knobs:
#   SUBNET          (default 10.88.7.0/24)
#   STORAGE_DRIVER  (default vfs; overlay also works)
#   PODMAN_TIMEOUT  seconds per podman call (default 60)
#   KEEP_ON_FAIL=1  on failure, wait for ENTER before cleaning up (debugging)
#   PODMAN_LOG_LEVEL (default warn)
#   HOSTPORT        when set (e.g. 8080), also checks hostPorts: a third container run with
#                   `-p HOSTPORT:80` answers from another namespace through the node's address,
#                   from the node and through 127.0.0.1; a fourth asking the same hostPort fails
#                   and leaves no veth or address; then the third's runtime is killed (conmon
#                   and the container, so no DEL comes) and the plugin's GC, given the live
#                   containers as valid attachments, must remove its mapping.
#   PLUGIN_CONF     with HOSTPORT: the plugin's JSON object from the conflist, for the GC call
#   IPAM_FILE       with HOSTPORT: the plugin's allocations.json (a refused ADD adds nothing)
#   BACKEND         with HOSTPORT: where the rules must be (nftables, iptables-nft or
#                   iptables-legacy: subnet.env's SLUICE_POLICY_BACKEND)
#
# Must run as root. Needs: podman (4.x), runc, conmon, busybox (static),
# nsenter, ip, timeout, /usr/lib/cni (containernetworking-plugins).

set -u -o pipefail
exec 3>&1 4>&2   # original stdout/stderr, restored in cleanup (traps can fire
                 # while a redirection such as 2>"$rlog" is in effect)

T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "+%.1fs", b-a}'; }

usage() {
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0" >&2
    exit 2
}

log()  { printf '[%s %s] %s\n' "${PFX:-two-containers}" "$(elapsed)" "$*" >&2; }
die()  { log "FAIL: $*"; exit 1; }

[ $# -eq 3 ] || usage
PLUGIN_BIN=$1
PLUGIN_TYPE=$2
TEMPLATE=$3

[ "$(id -u)" = 0 ] || die "must run as root"
[ -f "$PLUGIN_BIN" ] && [ -x "$PLUGIN_BIN" ] || die "PLUGIN_BIN '$PLUGIN_BIN' is not an executable file"
[[ "$PLUGIN_TYPE" =~ ^[A-Za-z0-9._-]+$ ]] || die "PLUGIN_TYPE '$PLUGIN_TYPE' is not a plain file name"
[ -r "$TEMPLATE" ] || die "CONFLIST_TEMPLATE '$TEMPLATE' is not readable"
for c in podman runc conmon nsenter ip timeout mktemp tar realpath mountpoint; do
    command -v "$c" >/dev/null 2>&1 || die "missing command: $c"
done
BUSYBOX=${BUSYBOX:-$(command -v busybox || true)}
[ -x "$BUSYBOX" ] || die "busybox not found"
# The image only contains busybox, so it must be statically linked.
if command -v ldd >/dev/null 2>&1 && [[ "$(ldd "$BUSYBOX" 2>&1)" == *"=>"* ]]; then
    die "$BUSYBOX is dynamically linked; install busybox-static"
fi
CNI_SYS_DIR=${CNI_SYS_DIR:-/usr/lib/cni}
[ -d "$CNI_SYS_DIR" ] || die "$CNI_SYS_DIR missing (containernetworking-plugins)"

# -s: keep a symlink's own name, which busybox-style plugins dispatch on (argv[0]).
PLUGIN_BIN=$(realpath -s "$PLUGIN_BIN")
TEMPLATE=$(realpath "$TEMPLATE")
SUBNET=${SUBNET:-10.88.7.0/24}
STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
TMO=${PODMAN_TIMEOUT:-60}
LOG_LEVEL=${PODMAN_LOG_LEVEL:-warn}

# ---------------------------------------------------------------- names ----
PFX="sp$$$(printf '%04x' $((RANDOM)))"      # e.g. sp12345a1b2
NODE_NS="${PFX}node"
NET_NAME="${PFX}net"
C1="${PFX}c1"
C2="${PFX}c2"
C3="${PFX}c3"
C4="${PFX}c4"
CLIENT_NS="${PFX}cli"
IMAGE="localhost/${PFX}img:latest"
TCP_PORT=7777
CNI_CACHE=/var/lib/cni          # libcni's default cache dir (podman does not override it)

WORK=""
PM_PID=""
CT_NETNS=()                      # container netns paths, for leak-proof cleanup
CREATED_RUN_NETNS=0
[ -d /run/netns ] || CREATED_RUN_NETNS=1
CREATED_CNI_CACHE=0
[ -d "$CNI_CACHE" ] || CREATED_CNI_CACHE=1
# podman import writes containers/image's blob-info cache here (no knob to move it).
BLOB_CACHE=/var/lib/containers
CREATED_BLOB_CACHE=0
[ -d "$BLOB_CACHE" ] || CREATED_BLOB_CACHE=1
# util-linux (u)mount may create this empty dir.
CREATED_RUN_MOUNT=0
[ -d /run/mount ] || CREATED_RUN_MOUNT=1
CLEANED=0

# ---------------------------------------------------------------- cleanup --
pm_raw() {   # podman with our private config, inside the node netns, bounded
    # Run in the background and `wait`, so that an INT/TERM trap fires at once
    # instead of after the podman call (stdin is /dev/null; none of ours reads it).
    timeout -k 5 "$TMO" nsenter --net="/run/netns/$NODE_NS" \
        env CONTAINERS_CONF="$WORK/containers.conf" TMPDIR="$WORK/tmp" \
        podman "${PODMAN_FLAGS[@]}" "$@" </dev/null &
    PM_PID=$!                    # timeout(1) leads its own process group
    wait "$PM_PID"
    local rc=$?
    PM_PID=""
    return $rc
}

cleanup() {
    local rc=$?
    [ "$CLEANED" = 1 ] && return
    CLEANED=1
    trap - EXIT; trap "" INT TERM
    set +e
    exec 1>&3 2>&4
    # A podman call still in flight (we were interrupted): stop it first, it
    # would otherwise hold podman's locks while we clean up.
    if [ -n "${PM_PID:-}" ] && kill -0 "$PM_PID" 2>/dev/null; then
        log "stopping in-flight podman call (pid $PM_PID)"
        kill -TERM -- "-$PM_PID" 2>/dev/null
        local j
        for j in $(seq 1 25); do kill -0 "$PM_PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$PM_PID" 2>/dev/null
    fi
    if [ "$rc" != 0 ] && [ "${KEEP_ON_FAIL:-0}" = 1 ] && [ -t 0 ]; then
        log "KEEP_ON_FAIL: state kept in $WORK, netns $NODE_NS; press ENTER to clean up"
        read -r _
    fi
    log "cleanup (exit code $rc)"
    if [ -n "$WORK" ] && [ -e "/run/netns/$NODE_NS" ] && [ -e "$WORK/containers.conf" ]; then
        # rm -f runs CNI DEL (inside the node netns, where the host side lives).
        pm_raw rm -f -t 0 --all >/dev/null 2>&1 || log "warning: podman rm failed"
        pm_raw rmi -f --all >/dev/null 2>&1
    fi
    # Containers podman failed to remove: kill + delete them with runc directly.
    if [ -n "$WORK" ] && [ -x "$WORK/bin/runc" ]; then
        local id
        for id in $(timeout 20 "$WORK/bin/runc" list -q 2>/dev/null); do
            log "runc delete --force $id (podman left it)"
            timeout 20 "$WORK/bin/runc" delete --force "$id" >/dev/null 2>&1
        done
    fi
    # Leftover processes started for this run (conmon, podman cleanup helpers,
    # a hung CNI plugin) reference $WORK in their command line or environment.
    if [ -n "$WORK" ]; then
        local p pids=()
        for p in /proc/[0-9]*; do
            p=${p#/proc/}
            [ "$p" = "$$" ] || [ "$p" = "${BASHPID:-$$}" ] && continue
            # cmdline (conmon, podman, shim) or env (anything podman spawned,
            # e.g. a hung CNI plugin: CONTAINERS_CONF/CNI_PATH point into $WORK)
            grep -qsaF -- "$WORK/" "/proc/$p/cmdline" "/proc/$p/environ" && pids+=("$p")
        done
        if [ ${#pids[@]} -gt 0 ]; then
            log "killing leftover processes: ${pids[*]}"
            kill -9 "${pids[@]}" 2>/dev/null
            sleep 0.5
        fi
        # Unmount anything under $WORK (overlay, shm, bind mounts), deepest first.
        local m i
        for i in 1 2 3; do
            mapfile -t mnts < <(awk -v w="$WORK/" 'index($5, w) == 1 || $5 == substr(w, 1, length(w)-1) {print $5}' /proc/self/mountinfo | sort -r)
            [ ${#mnts[@]} -eq 0 ] && break
            log "unmounting ${#mnts[@]} leftover mount(s) under $WORK"
            for m in "${mnts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
        done
    fi
    # Per-run cgroup parent (/sys/fs/cgroup/<ctrl>/$PFX: containers + conmon).
    local cg
    for cg in /sys/fs/cgroup/*/"$PFX"; do
        [ -d "$cg" ] || continue
        for i in 1 2 3 4 5; do
            find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null
            [ -d "$cg" ] || break
            sleep 0.2
        done
        [ -d "$cg" ] && log "warning: cannot remove cgroup $cg"
    done
    # Container netns that podman did not remove for whatever reason.
    local ns
    for ns in "${CT_NETNS[@]}"; do
        if [ -e "$ns" ]; then
            log "removing leaked container netns $ns"
            umount "$ns" 2>/dev/null || umount -l "$ns" 2>/dev/null
            rm -f "$ns"
        fi
    done
    if [ -n "$WORK" ] && [ -s "$WORK/cni-calls.log" ]; then
        log "calls to $PLUGIN_TYPE: $(awk '{print $1, $4}' "$WORK/cni-calls.log" | sort | uniq -c | awk '{printf "%s%s x%s %s", s, $2, $1, $3; s=", "}')"
        local adds dels
        adds=$(grep -c '^ADD .* rc=0$' "$WORK/cni-calls.log")
        dels=$(grep -c '^DEL ' "$WORK/cni-calls.log")
        [ "$dels" -lt "$adds" ] && log "warning: $adds successful ADD(s) but only $dels DEL(s)"
    fi
    # A podman killed between creating /run/netns/netns-<uuid> and bind-mounting
    # the namespace onto it leaves an empty plain file behind (`ip netns list`
    # then prints "Peer netns reference is invalid"). Remove such files that
    # appeared during this run and stay unmounted.
    if [ -n "$WORK" ] && [ -e "$WORK/.t0" ]; then
        local f
        for f in /run/netns/netns-*; do
            [ -f "$f" ] && [ "$f" -nt "$WORK/.t0" ] || continue
            mountpoint -q "$f" && continue
            sleep 0.2
            mountpoint -q "$f" && continue
            log "removing half-created netns file $f"
            rm -f "$f"
        done
    fi
    [ -e "/run/netns/$NODE_NS" ] && ip netns del "$NODE_NS"
    [ -e "/run/netns/$CLIENT_NS" ] && ip netns del "$CLIENT_NS"
    # libcni result cache entries for our network (named <net>-<container id>-<if>).
    rm -f "$CNI_CACHE/results/${NET_NAME}-"* 2>/dev/null
    rm -rf "$CNI_CACHE/networks/${NET_NAME}" 2>/dev/null
    if [ "$CREATED_CNI_CACHE" = 1 ]; then
        rmdir "$CNI_CACHE/results" "$CNI_CACHE/networks" "$CNI_CACHE" 2>/dev/null
    fi
    if [ "$CREATED_BLOB_CACHE" = 1 ]; then
        rm -f "$BLOB_CACHE/cache/blob-info-cache-v1.boltdb"
        rmdir "$BLOB_CACHE/cache" "$BLOB_CACHE" 2>/dev/null
    fi
    # `ip netns add` turns /run/netns into a shared bind mount; undo it if we
    # created it and nobody else uses it (umount fails if something is below).
    if [ "$CREATED_RUN_NETNS" = 1 ] && [ -d /run/netns ] && [ -z "$(ls -A /run/netns 2>/dev/null)" ]; then
        while umount /run/netns 2>/dev/null; do :; done
        rmdir /run/netns 2>/dev/null
    fi
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if awk -v w="$WORK" 'index($5, w) == 1 {f=1} END{exit !f}' /proc/self/mountinfo; then
            log "warning: mounts remain under $WORK; not deleting it"
        else
            rm -rf --one-file-system "$WORK"
        fi
    fi
    [ "$CREATED_RUN_MOUNT" = 1 ] && rmdir /run/mount 2>/dev/null
    local left
    left=$(ip netns list 2>/dev/null | grep -F "$PFX"; grep -F "$PFX" /proc/self/mountinfo
           ls -d /sys/fs/cgroup/*/"$PFX" "$WORK" 2>/dev/null)
    [ -n "$left" ] && log "warning: leftovers: $left"
    log "done; result: $([ "$rc" = 0 ] && echo PASS || echo "FAIL ($rc)")"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- setup ----
WORK=$(mktemp -d "/tmp/${PFX}.XXXXXX") || die "mktemp failed"
chmod 755 "$WORK"
touch "$WORK/.t0"
mkdir -p "$WORK"/{root,runroot,libpod-tmp,tmp,cni-bin,net.d,ipam,rootfs,bin,runc}
RUNC=$(command -v runc)
# runc wrapper keeping runc's state (--root, default /run/runc) in $WORK. A
# --runtime-flag would not do: podman does not forward it to the
# "podman container cleanup" exit command that conmon runs.
printf '#!/bin/sh\nexec %s --root %s "$@"\n' "$RUNC" "$WORK/runc" >"$WORK/bin/runc"
chmod 755 "$WORK/bin/runc"

PODMAN_FLAGS=(
    --log-level "$LOG_LEVEL"
    --root "$WORK/root"
    --runroot "$WORK/runroot"
    --tmpdir "$WORK/libpod-tmp"
    --storage-driver "$STORAGE_DRIVER"
    --network-config-dir "$WORK/net.d"
    --cgroup-manager cgroupfs
    --events-backend file
    --runtime runc
)

log "prefix $PFX, workdir $WORK, plugin $PLUGIN_TYPE -> $PLUGIN_BIN, storage $STORAGE_DRIVER"

# CNI plugin dir: Debian's plugins + PLUGIN_TYPE -> PLUGIN_BIN.
for f in "$CNI_SYS_DIR"/*; do
    [ -f "$f" ] && [ -x "$f" ] && ln -s "$f" "$WORK/cni-bin/$(basename "$f")"
done
rm -f "$WORK/cni-bin/$PLUGIN_TYPE"
CALLS="$WORK/cni-calls.log"
if [ "${TRACE_PLUGIN:-1}" = 1 ]; then
    # Thin shim: runs PLUGIN_BIN unchanged (stdin/stdout/env pass through) and
    # records each call, so we can prove PLUGIN_BIN did the ADDs and DELs.
    cat >"$WORK/cni-bin/$PLUGIN_TYPE" <<EOF
#!/bin/sh
"$PLUGIN_BIN" "\$@"
rc=\$?
echo "\${CNI_COMMAND:-?} \${CNI_CONTAINERID:--} \${CNI_IFNAME:--} rc=\$rc" >>"$CALLS"
exit \$rc
EOF
    chmod 755 "$WORK/cni-bin/$PLUGIN_TYPE"
else
    ln -s "$PLUGIN_BIN" "$WORK/cni-bin/$PLUGIN_TYPE"
fi
: >"$CALLS"

# Conflist from the template.
CONFLIST="$WORK/net.d/${NET_NAME}.conflist"
sed -e "s|@NAME@|$NET_NAME|g" \
    -e "s|@TYPE@|$PLUGIN_TYPE|g" \
    -e "s|@SUBNET@|$SUBNET|g" \
    -e "s|@IPAM_DIR@|$WORK/ipam|g" \
    -e "s|@WORKDIR@|$WORK|g" \
    -e "s|@PREFIX@|$PFX|g" \
    -e "s|@NODE_NS@|$NODE_NS|g" \
    "$TEMPLATE" >"$CONFLIST" || die "cannot write conflist"
if grep -qE '@[A-Z_]+@' "$CONFLIST"; then
    die "unknown placeholder(s) in template: $(grep -oE '@[A-Z_]+@' "$CONFLIST" | sort -u | tr '\n' ' ')"
fi
grep -q "\"$NET_NAME\"" "$CONFLIST" || die "template must set \"name\": \"@NAME@\""

# Podman (root) otherwise asks runc for nofile/nproc = 1048576, which fails
# when the hard limits are lower and CAP_SYS_RESOURCE is missing.
lim() { local h; h=$(ulimit -H "$1"); [ "$h" = unlimited ] || [ "$h" -gt "$2" ] && h=$2; echo "$h"; }
NOFILE=$(lim -n 1024); NPROC=$(lim -u 4096)

# Private containers.conf (CONTAINERS_CONF replaces all system containers.conf files).
cat >"$WORK/containers.conf" <<EOF
[containers]
default_sysctls = ["net.ipv4.ping_group_range=0 0"]
default_ulimits = ["nofile=$NOFILE:$NOFILE", "nproc=$NPROC:$NPROC"]
log_driver = "k8s-file"

[network]
network_backend = "cni"
cni_plugin_dirs = ["$WORK/cni-bin"]
network_config_dir = "$WORK/net.d"
# NOT \$NET_NAME: podman synthesizes an in-memory bridge network (10.88.0.0/16)
# under the default name when no valid conflist has it, which would make the
# test pass without ever running PLUGIN_BIN.
default_network = "${PFX}unused"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$WORK/libpod-tmp/events.log"
tmp_dir = "$WORK/libpod-tmp"
volume_path = "$WORK/root/volumes"
image_copy_tmp_dir = "$WORK/tmp"
lock_type = "file"
no_pivot_root = false

[engine.runtimes]
runc = ["$WORK/bin/runc"]
EOF

# Node netns: lo up, forwarding on (routed veth plugins need it).
ip netns add "$NODE_NS" || die "ip netns add $NODE_NS failed"
ip -n "$NODE_NS" link set lo up || die "cannot bring up lo in $NODE_NS"
nsenter --net="/run/netns/$NODE_NS" sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward' \
    || die "cannot enable ip_forward in $NODE_NS"
[ "$(nsenter --net="/run/netns/$NODE_NS" cat /proc/sys/net/ipv4/ip_forward)" = 1 ] \
    || die "ip_forward not set in $NODE_NS"

pm() {   # like pm_raw; stdout kept clean, stderr shown indented (always on failure)
    local rc err="$WORK/pm.err"
    pm_raw "$@" 2>"$err"; rc=$?
    if [ $rc -ne 0 ]; then
        log "podman $* -> exit $rc"
        [ $rc -eq 124 ] && log "(timed out after ${TMO}s)"
    fi
    [ -s "$err" ] && sed 's/^/    /' "$err" >&2
    return $rc
}

# Image without a registry: static busybox + applet symlinks.
R="$WORK/rootfs"
mkdir -p "$R"/{bin,etc,tmp,proc,sys,dev,root,run}
cp "$BUSYBOX" "$R/bin/busybox"
for a in sh ash ping nc ip sleep cat echo hostname ls ps ifconfig route timeout \
         grep sed awk wget arp netstat true false kill ip env; do
    ln -sf busybox "$R/bin/$a"
done
printf '#!/bin/sh\necho "tcp-hello-from $(hostname)"\n' >"$R/bin/hello"
chmod 755 "$R/bin/hello"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$R/etc/passwd"
printf 'root:x:0:\n' >"$R/etc/group"
tar --numeric-owner -C "$R" -cf "$WORK/rootfs.tar" . || die "tar failed"
pm import -q --change 'CMD ["/bin/sh"]' "$WORK/rootfs.tar" "$IMAGE" >/dev/null \
    || die "podman import failed"

NETS=$(pm network ls --format '{{.Name}}') || die "podman network ls failed"
# (no `pm ... | grep -q` anywhere: with pipefail, grep -q closing the pipe early
#  makes podman die of SIGPIPE, exit 141, and the check fail randomly)
printf '%s\n' "$NETS" | grep -qx "$NET_NAME" \
    || die "podman does not see network $NET_NAME (config dir $WORK/net.d; invalid conflist, or plugin failed CNI_COMMAND=VERSION?)"
log "network $NET_NAME: driver $(pm network inspect --format '{{.Driver}}' "$NET_NAME")"

# Container command: TCP responder in background, sleep as the main process.
CMD="nc -ll -p $TCP_PORT -e /bin/hello & exec sleep 3600"
for c in "$C1" "$C2"; do
    # Debug log so that we learn the container netns path even if podman dies
    # (e.g. timeout while the plugin hangs in ADD); otherwise it would leak.
    rlog="$WORK/run-$c.log"
    pm_raw --log-level debug run -d --pull never --name "$c" --hostname "$c" \
        --cgroup-parent "/$PFX" \
        --network "$NET_NAME" "$IMAGE" /bin/sh -c "$CMD" >/dev/null 2>"$rlog"
    rc=$?
    while read -r ns; do CT_NETNS+=("$ns"); done \
        < <(sed -n 's/.*Made network namespace at \([^ ]*\) for container.*/\1/p' "$rlog")
    if [ $rc -ne 0 ]; then
        log "podman run $c -> exit $rc$([ $rc -eq 124 ] && echo " (timed out after ${TMO}s)")"
        grep -E 'level=(warning|error|fatal)|^Error' "$rlog" | tail -n 20 | sed 's/^/    /' >&2
        die "podman run $c failed"
    fi
done

if [ "${TRACE_PLUGIN:-1}" = 1 ]; then
    n=$(grep -c '^ADD .* rc=0$' "$CALLS")
    [ "$n" -ge 2 ] || die "$PLUGIN_TYPE was not called for both containers (successful ADDs: $n)"
fi

ip_of() {
    pm inspect -f "{{(index .NetworkSettings.Networks \"$NET_NAME\").IPAddress}}" "$1"
}
IP1=$(ip_of "$C1") || die "cannot inspect $C1"
IP2=$(ip_of "$C2") || die "cannot inspect $C2"
[[ "$IP1" =~ ^[0-9]+(\.[0-9]+){3}$ ]] || die "$C1 has no IPv4 address on $NET_NAME (got '$IP1')"
[[ "$IP2" =~ ^[0-9]+(\.[0-9]+){3}$ ]] || die "$C2 has no IPv4 address on $NET_NAME (got '$IP2')"
[ "$IP1" != "$IP2" ] || die "both containers got the same IP $IP1"
log "$C1 ip $IP1"
log "$C2 ip $IP2"
echo "IP $C1=$IP1"
echo "IP $C2=$IP2"

diag() {
    log "---- diagnostics ----"
    { echo "# node netns $NODE_NS"; ip -n "$NODE_NS" addr; ip -n "$NODE_NS" route
      for c in "$C1" "$C2"; do
          echo "# $c"; pm_raw exec "$c" ip addr; pm_raw exec "$c" ip route
          pm_raw exec "$c" ip neigh
      done; } 2>&1 | sed 's/^/    /' >&2
}

FAILS=0
check() {   # check DESCRIPTION CMD...
    local desc=$1; shift
    if out=$("$@" 2>&1); then
        log "OK   $desc"
        echo "PASS $desc"
    else
        log "FAIL $desc"
        printf '%s\n' "$out" | sed 's/^/    /' >&2
        echo "FAIL $desc"
        FAILS=$((FAILS + 1))
    fi
}
ping_from() { pm_raw exec "$1" ping -c 3 -i 0.2 -W 2 "$2"; }
tcp_from() {  # retry (only) while the responder may still be starting
    local i out
    for i in 1 2 3 4 5; do
        out=$(pm_raw exec "$1" nc -w 3 "$2" "$TCP_PORT" </dev/null 2>&1)
        if [[ "$out" == *"tcp-hello-from $3"* ]]; then echo "$out"; return 0; fi
        [[ "$out" == *[Rr]efused* ]] || break
        sleep 1
    done
    echo "no/wrong answer: $out"; return 1
}

check "ping $C1 ($IP1) -> $C2 ($IP2)" ping_from "$C1" "$IP2"
check "ping $C2 ($IP2) -> $C1 ($IP1)" ping_from "$C2" "$IP1"
check "tcp  $C1 -> $IP2:$TCP_PORT" tcp_from "$C1" "$IP2" "$C2"
check "tcp  $C2 -> $IP1:$TCP_PORT" tcp_from "$C2" "$IP1" "$C1"

if [ "$FAILS" -ne 0 ]; then
    diag
    die "$FAILS connectivity check(s) failed between $C1 ($IP1) and $C2 ($IP2)"
fi
log "containers reach each other ($IP1 <-> $IP2)"
[ -n "${HOSTPORT:-}" ] || exit 0

# ---------------------------------------------------------------- hostPort -
[[ "$HOSTPORT" =~ ^[0-9]+$ ]] || die "HOSTPORT '$HOSTPORT' is not a port"
[ -n "${PLUGIN_CONF:-}" ] || die "HOSTPORT needs PLUGIN_CONF"
[ -n "${IPAM_FILE:-}" ] || die "HOSTPORT needs IPAM_FILE"
NODE_IP=172.31.251.1
CLIENT_IP=172.31.251.2
ip netns add "$CLIENT_NS" || die "ip netns add $CLIENT_NS failed"
ip -n "$NODE_NS" link add "${PFX}v" type veth peer name eth0 netns "$CLIENT_NS" \
    || die "cannot make the client's veth"
ip -n "$NODE_NS" addr add "$NODE_IP/24" dev "${PFX}v"
ip -n "$NODE_NS" link set "${PFX}v" up
ip -n "$CLIENT_NS" addr add "$CLIENT_IP/24" dev eth0
ip -n "$CLIENT_NS" link set eth0 up
ip -n "$CLIENT_NS" link set lo up

run_ct() {   # run_ct NAME PODMAN-RUN-ARGS... (the netns is recorded for cleanup)
    local name=$1; shift
    local rlog="$WORK/run-$name.log" rc
    pm_raw --log-level debug run -d --pull never --name "$name" --hostname "$name" \
        --cgroup-parent "/$PFX" --network "$NET_NAME" "$@" >/dev/null 2>"$rlog"
    rc=$?
    while read -r ns; do CT_NETNS+=("$ns"); done \
        < <(sed -n 's/.*Made network namespace at \([^ ]*\) for container.*/\1/p' "$rlog")
    return $rc
}
HCMD="nc -ll -p 80 -e /bin/hello & exec sleep 3600"
run_ct "$C3" -p "$HOSTPORT:80" "$IMAGE" /bin/sh -c "$HCMD" || {
    grep -E 'level=(warning|error|fatal)|^Error' "$WORK/run-$C3.log" | tail -n 20 | sed 's/^/    /' >&2
    die "podman run -p $HOSTPORT:80 $C3 failed"
}
grep -q '"portMappings"' "$WORK/run-$C3.log" 2>/dev/null \
    || log "note: podman's debug log does not show the portMappings it sent"

hp_from() {  # hp_from NETNS IP: the hostPort answers with C3's greeting (retried while it starts)
    local i out
    for i in 1 2 3 4 5; do
        out=$(timeout 10 nsenter --net="/run/netns/$1" "$BUSYBOX" nc -w 3 "$2" "$HOSTPORT" </dev/null 2>&1)
        if [[ "$out" == *"tcp-hello-from $C3"* ]]; then echo "$out"; return 0; fi
        sleep 1
    done
    echo "no/wrong answer: $out"; return 1
}
hp_closed() {  # hp_closed NETNS IP: nothing answers on the hostPort
    local out
    out=$(timeout 10 nsenter --net="/run/netns/$1" "$BUSYBOX" nc -w 2 "$2" "$HOSTPORT" </dev/null 2>&1)
    [[ "$out" != *"tcp-hello-from"* ]] || { echo "still answers: $out"; return 1; }
}
rules() {
    nsenter --net="/run/netns/$NODE_NS" nft list ruleset 2>/dev/null
    for t in iptables-nft-save iptables-legacy-save; do
        command -v "$t" >/dev/null && nsenter --net="/run/netns/$NODE_NS" "$t" -t nat 2>/dev/null
    done
}
sl_links() { ip -n "$NODE_NS" -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | grep '^sl' | sort; }

# The hostPort's rule as nft lists sluice's map element, or as iptables-save lists the DNAT.
HP_RULE="(tcp \\. $HOSTPORT : |--dport $HOSTPORT )"
in_backend() {  # the DNAT rule for the hostPort is where BACKEND says
    case "${BACKEND:-nftables}" in
        nftables) nsenter --net="/run/netns/$NODE_NS" nft list table inet sluice-hostport ;;
        *) nsenter --net="/run/netns/$NODE_NS" "$BACKEND-save" -t nat | grep '^-A SLUICE-HP ' ;;
    esac | grep -E "$HP_RULE"
}
check "hostport rule in ${BACKEND:-nftables}" in_backend
check "hostport from another netns via $NODE_IP:$HOSTPORT" hp_from "$CLIENT_NS" "$NODE_IP"
check "hostport from the node via $NODE_IP:$HOSTPORT" hp_from "$NODE_NS" "$NODE_IP"
check "hostport from the node via 127.0.0.1:$HOSTPORT" hp_from "$NODE_NS" 127.0.0.1

links_before=$(sl_links)
owners() { grep -c '"containerID"' "$IPAM_FILE" 2>/dev/null; }
owners_before=$(owners)
if run_ct "$C4" -p "$HOSTPORT:80" "$IMAGE" /bin/sh -c "$HCMD"; then
    echo "FAIL second container got hostPort $HOSTPORT"; FAILS=$((FAILS + 1))
else
    if grep -q "already held by container" "$WORK/run-$C4.log"; then
        echo "PASS second container refused hostPort $HOSTPORT"
        log "OK   second container refused: $(grep -o 'hostPort [^"]*already held[^"]*' "$WORK/run-$C4.log" | head -n 1)"
    else
        echo "FAIL second container failed for another reason"
        grep -E 'level=(error|fatal)|^Error' "$WORK/run-$C4.log" | tail -n 5 | sed 's/^/    /' >&2
        FAILS=$((FAILS + 1))
    fi
fi
pm_raw rm -f -t 0 "$C4" >/dev/null 2>&1
check "the refused container left no veth" test "$(sl_links)" = "$links_before"
check "the refused container left no address or mapping" test "$(owners)" = "$owners_before"
check "hostport still served by $C3" hp_from "$CLIENT_NS" "$NODE_IP"

# The runtime dies without DEL: conmon first (so nothing runs podman's cleanup), then the
# container; then GC with the containers still alive as the valid attachments.
C3ID=$(pm inspect -f '{{.Id}}' "$C3") || die "cannot inspect $C3"
C1ID=$(pm inspect -f '{{.Id}}' "$C1")
C2ID=$(pm inspect -f '{{.Id}}' "$C2")
CONMON=$(pm inspect -f '{{.State.ConmonPid}}' "$C3")
[[ "$CONMON" =~ ^[0-9]+$ ]] && [ "$CONMON" -gt 1 ] && kill -9 "$CONMON"
timeout 20 "$WORK/bin/runc" kill "$C3ID" KILL >/dev/null 2>&1
for i in $(seq 1 50); do
    st=$(timeout 10 "$WORK/bin/runc" state "$C3ID" 2>/dev/null | grep -o '"status": *"[a-z]*"')
    [[ "$st" == *stopped* || -z "$st" ]] && break
    sleep 0.1
done
GC_CONF="${PLUGIN_CONF%\}},\"cniVersion\":\"1.1.0\",\"name\":\"$NET_NAME\",\"cni.dev/valid-attachments\":[{\"containerID\":\"$C1ID\",\"ifname\":\"eth0\"},{\"containerID\":\"$C2ID\",\"ifname\":\"eth0\"}]}"
gc_out=$(printf '%s' "$GC_CONF" | nsenter --net="/run/netns/$NODE_NS" env CNI_COMMAND=GC CNI_PATH="$WORK/cni-bin" "$WORK/cni-bin/$PLUGIN_TYPE" 2>&1)
check "GC after the killed runtime (rc 0)" test -z "$gc_out"
[ -n "$gc_out" ] && log "GC said: $gc_out"
check "no hostport after GC (from another netns)" hp_closed "$CLIENT_NS" "$NODE_IP"
check "no hostport after GC (127.0.0.1)" hp_closed "$NODE_NS" 127.0.0.1
check "no hostport rule after GC" bash -c "! printf '%s' \"\$1\" | grep -qE \"\$2\"" _ "$(rules)" "$HP_RULE"
if [ "$FAILS" -ne 0 ]; then
    rules | sed 's/^/    /' >&2
    diag
    die "$FAILS hostPort check(s) failed"
fi
log "hostPort $HOSTPORT: reached, refused to a second container, collected after a killed runtime"
exit 0
