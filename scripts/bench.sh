#!/usr/bin/env bash
# Runs every benchmark of integration/BENCHMARKS.md in one go, in release
# builds, with the peers they compare against (iptables, nftables, etcd 3.4).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
if ! dpkg-query -W -f='${Status}' etcd-server 2>/dev/null | grep -q "ok installed"; then
    echo "[bench] installing etcd-server (the peer of the controller cluster)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
fi
cargo build --release --workspace --bins --examples
echo "== rule-count scaling"; ./target/release/examples/bench_rules
echo "== iptables / nftables"; ./target/release/examples/firewall_compare
echo "== enforcement latency"; ./target/release/examples/enforcement_latency
echo "== controller cluster vs etcd"; ./target/release/examples/raft_compare
echo "== overlay throughput vs bare kernel VXLAN"; ./target/release/examples/overlay_throughput
