#!/usr/bin/env bash
# The whole test suite: unit tests, eBPF packet fixtures (BPF_PROG_TEST_RUN)
# and integration tests in network namespaces. Installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
# A build from scratch gains nothing from incremental caches, and they more
# than double the size of the target directory (the upgrade tests add three
# earlier releases' builds beside it).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
echo "[test] building" >&2
cargo build --workspace --bins
echo "[test] running the suite" >&2
# One test at a time: integration tests time real traffic on a 2-core machine.
cargo test --workspace -- --test-threads=1
echo "[test] every benchmark, once, short (smoke)" >&2
bash scripts/bench.sh --smoke
echo "[test] checking that nothing was left behind" >&2
leftover_ns=$(ip netns list | grep -E '^(sg[a-z]|ov[a-z]|zn[a-z]|cl[a-z0-9]|demo|lat|fwb|rcmp|hsc|rcu|flw|rec|slg|fcb|mir|mcb|bwp|sab|lbt|lbh|lbc|lbcp|lbn|vrp|hav|vfo|kfo|kcs|tvr|tvu|tvc|hv6|hpu)-' || true)
leftover_mounts=$(grep -E ' /tmp/sdn-' /proc/mounts || true)
if [[ -n "$leftover_ns$leftover_mounts" ]]; then
    echo "[test] FAILED: tests left namespaces or mounts behind:" >&2
    echo "$leftover_ns" "$leftover_mounts" >&2
    exit 1
fi
echo "[test] all passed" >&2
