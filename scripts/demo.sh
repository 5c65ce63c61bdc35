#!/usr/bin/env bash
# The main job, end to end: installs what is missing, builds, and runs the
# demo (controller, two host agents, three VMs in network namespaces, policy
# from policies/examples/, real traffic).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
echo "[demo] building (the first build takes several minutes on 2 cores)" >&2
cargo build --workspace --bins
exec ./target/debug/sdn-demo
