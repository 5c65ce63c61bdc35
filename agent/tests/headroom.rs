//! Every program and stage of the pipeline keeps room to grow: its stack
//! at most 70% of the kernel's 512 bytes, and the instructions the verifier
//! processed at most 70% of its limit. Prints both per program, so the room
//! left is seen on every run and cannot silently run out.

use sdn_agent::dataplane::{tc_programs, Dataplane, STACK_LIMIT, VERIFIER_INSN_LIMIT, XDP_PROGRAM};
use sdn_agent::testutil::{can_load_bpf, BpffsMount};

#[test]
fn every_program_keeps_thirty_percent_headroom() {
    if !can_load_bpf() {
        eprintln!("skipping: loading eBPF needs root");
        return;
    }
    let mount = BpffsMount::new("headroom").expect("bpffs");
    let dp = Dataplane::load(&mount.path().join("agent")).expect("load dataplane");
    let mut over = Vec::new();
    eprintln!(
        "{:<14} {:>10} {:>8} {:>7} {:>6}",
        "program", "verified", "% limit", "stack", "% 512"
    );
    for name in tc_programs().chain([XDP_PROGRAM]) {
        let h = dp.headroom(name).expect("program info");
        let insn_pct = h.verified_insns as f64 * 100.0 / VERIFIER_INSN_LIMIT as f64;
        let stack_pct = h.stack_bytes as f64 * 100.0 / STACK_LIMIT as f64;
        eprintln!(
            "{name:<14} {:>10} {insn_pct:>7.1}% {:>7} {stack_pct:>5.1}%",
            h.verified_insns, h.stack_bytes
        );
        assert!(
            h.verified_insns > 0,
            "{name}: the kernel reports no verified instructions"
        );
        if insn_pct > 70.0 || stack_pct > 70.0 {
            over.push(name);
        }
    }
    assert!(over.is_empty(), "over 70% of a verifier limit: {over:?}");
}
