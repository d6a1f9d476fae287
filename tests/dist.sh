#!/usr/bin/env bash
# Builds the shipped artifact exactly as README's "Install on a cluster" says (the block after
# `<!-- dist-command -->`), on whatever machine runs it, and checks what DESIGN.md promises of
# it: a static binary (`file`: "statically linked"; `ldd`: "not a dynamic executable"). Prints
# its size. README's test command runs this, so a README that stops building fails CI.
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=$(awk '/<!-- dist-command -->/ {armed=1; next} armed && /^```/ {if (inblock) exit; inblock=1; next} inblock {print}' README.md)
[ -n "$cmd" ] || { echo "tests/dist.sh: README.md has no command after <!-- dist-command -->" >&2; exit 1; }
echo "+ $cmd" >&2
bash -euo pipefail -c "$cmd"
bin=target/x86_64-unknown-linux-musl/release/sluice
kind=$(file -b "$bin")
case "$kind" in *"statically linked"*) ;; *) echo "tests/dist.sh: $bin is not static: $kind" >&2; exit 1;; esac
linked=$(ldd "$bin" 2>&1 || true)
case "$linked" in *"not a dynamic executable"*|*"statically linked"*) ;; *) echo "tests/dist.sh: ldd $bin: $linked" >&2; exit 1;; esac
"$bin" version
echo "dist: $bin, $(stat -c %s "$bin") bytes ($(( $(stat -c %s "$bin") / 1024 / 1024 )) MiB), $kind"
