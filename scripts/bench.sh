#!/usr/bin/env bash
# Runs every benchmark of integration/BENCHMARKS.md in one go, in release
# builds, with the peers they compare against (iptables, nftables, etcd 3.4).
#
#   bash scripts/bench.sh           the figures of the benchmark document
#   bash scripts/bench.sh --smoke   every benchmark once, short, in the debug
#                                   build the test suite made: proves each
#                                   still runs (the suite calls this), no figures
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=0
[[ "${1:-}" == "--smoke" ]] && smoke=1
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
if ((smoke)); then
    cargo build --workspace --bins --examples
    bin=./target/debug/examples
    # (SECONDS is also bash's own clock: set it for the child only.)
    short=(env ROUNDS=1 SECONDS=1 KILLS=1 FLOOD=20000)
    smoke_args=(--smoke)
else
    cargo build --release --workspace --bins --examples
    bin=./target/release/examples
    short=()
    smoke_args=()
fi
run() {
    local title=$1
    shift
    echo "== $title" >&2
    "${short[@]}" "$@"
}
run "per-packet cost and rule-count scaling" "$bin/bench_rules" "${smoke_args[@]}"
run "the load balancer's per-packet cost" "$bin/bench_lb" "${smoke_args[@]}"
run "the load balancer against nftables DNAT and haproxy" "$bin/lb_compare"
run "the HTTP proxy against nginx and haproxy, one core each" "$bin/l7_compare"
run "a virtual IP's failover gap against keepalived" "$bin/vip_failover"
run "iptables / nftables, stateful" "$bin/firewall_compare"
run "iptables / nftables, every packet a new flow" env NEW_FLOWS=1 "$bin/firewall_compare"
run "enforcement latency" "$bin/enforcement_latency"
run "controller cluster vs etcd" "$bin/raft_compare"
run "mutual TLS against plaintext at the controller" "$bin/tls_compare"
run "overlay throughput vs bare kernel VXLAN" "$bin/overlay_throughput"
run "a SYN flood at one port beside a long-lived flow" "$bin/syn_flood"
run "flow records against softflowd, same traffic, same nfdump" "$bin/flow_counts"
run "mirroring's cost against tc mirred and nft dup; copies at 1 Gbit/s" "$bin/mirror_cost"
run "an information system's traffic counted, against nftables counters" "$bin/system_accounting"
run "a host of 500 ports: one agent pass after a one-port change" "$bin/bench_host" "${smoke_args[@]}"
run "the controller at scale: write latency against state size" "$bin/controller_scale" "${smoke_args[@]}"
run "the controller at scale, three replicas" env REPLICAS=3 "$bin/controller_scale" "${smoke_args[@]}"
((smoke)) && echo "[bench] every benchmark ran (smoke)" >&2
exit 0
