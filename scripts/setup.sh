#!/usr/bin/env bash
# Installs what building and testing the project needs, skipping what is present:
# Debian packages, the nightly toolchain's rust-src, and bpf-linker built
# against the nightly's own LLVM. Safe to run again.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    echo "setup: run as root (network namespaces, eBPF and apt need it)" >&2
    exit 1
fi

# --- Debian packages -------------------------------------------------------
PKGS=(
    protobuf-compiler   # protoc for tonic/prost code generation
    iproute2            # ip netns, veth, tc
    iputils-ping        # ping / ping -6
    ncat                # real TCP/UDP peer in the demo and tests
    tcpdump
    nftables iptables   # benchmark peers
    iperf3              # traffic generator for benchmarks
    nmap                # cross-zone scans
    arping ndisc6       # gateway ARP and neighbour-discovery checks
    python3-scapy       # hand-made packets (forged VXLAN headers)
    bpftool             # inspection of loaded programs and pins
    etcd-server         # the controller cluster's benchmark peer
    clang llvm          # not needed to build, useful to read verifier output
    cmake libclang-dev  # BoringSSL (the `boring` crate) builds from source
    openssl             # s_client: a TLS peer in the tests
    python3-grpcio      # a gRPC client that is not ours, in the tests
    prometheus curl     # promtool checks the /metrics endpoints; curl scrapes them
    tshark nfdump pmacct # IPFIX decoders the flow exporter is checked against
    softflowd           # the peer of the flow-count figures
    rsyslog rsyslog-gnutls # the syslog receiver security events are checked against
    dnsmasq-base bind9-dnsutils # a DNS server and dig, whose answers the DNS records are checked against
    chromium-headless-shell # the browser the topology page is checked in
    nginx-light         # backends behind the load balancers
    haproxy             # the peer of the load balancer's figures
    nghttp2-client wrk  # h2load and wrk: HTTP/2 and HTTP/1.1 load on the HTTP proxy
    keepalived conntrackd # VRRP peers of the virtual IPs, and their figures' baseline
)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "Debian packages present"
fi

# --- Rust: the nightly with rust-src for the eBPF target -----------------
export PATH="$HOME/.cargo/bin:$PATH"
if ! rustup toolchain list | grep -q '^nightly'; then
    log "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal --component rust-src
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
    log "adding rust-src to the nightly"
    rustup component add rust-src --toolchain nightly
else
    log "nightly rust-src present"
fi

# --- bpf-linker against the nightly's own LLVM -----------------------------
if command -v bpf-linker >/dev/null 2>&1 && bpf-linker --version >/dev/null 2>&1; then
    log "bpf-linker present ($(bpf-linker --version 2>&1 | head -1))"
else
    sysroot=$(rustc +nightly --print sysroot)
    lib=$(ls "$sysroot"/lib/libLLVM.so.* 2>/dev/null | head -1)
    if [[ -z "$lib" ]]; then
        echo "setup: the nightly at $sysroot ships no libLLVM.so; cannot build bpf-linker" >&2
        exit 1
    fi
    major=$(basename "$lib" | sed -E 's/libLLVM\.so\.([0-9]+).*/\1/')
    prefix="$HOME/.cache/bpf-linker-llvm"
    mkdir -p "$prefix/lib"
    ln -sf "$lib" "$prefix/lib/libLLVM.so"
    ln -sf "$lib" "$prefix/lib/$(basename "$lib")"
    log "building bpf-linker against LLVM $major (a few minutes on 2 cores)"
    LLVM_PREFIX="$prefix" cargo install --locked bpf-linker --no-default-features --features "llvm-$major" \
        || LLVM_PREFIX="$prefix" cargo install bpf-linker --no-default-features --features "llvm-$major"
fi
log "ready"
