//! BPF_PROG_TEST_RUN: runs a loaded program on a packet in the kernel and
//! returns its verdict, output packet and mean run time. aya 0.13 has no
//! wrapper for this command, so it is issued with bpf(2) directly.

use std::os::fd::RawFd;

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    // Zeroed explicitly: stray padding makes the kernel answer EINVAL.
    _pad: u32,
}

/// The result of a test run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub retval: u32,
    pub packet: Vec<u8>,
    /// Mean nanoseconds per run, as the kernel measured it.
    pub ns_per_run: u32,
}

/// Runs `prog_fd` on `packet` `repeat` times (at least once).
pub fn run(prog_fd: RawFd, packet: &[u8], repeat: u32) -> std::io::Result<Run> {
    let mut out = vec![0u8; packet.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: prog_fd as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: repeat.max(1),
        ..Default::default()
    };
    // SAFETY: attr is a fully initialised repr(C) struct whose pointers
    // outlive the call; the kernel writes only within the sizes given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>() as libc::c_uint,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    out.truncate(attr.data_size_out as usize);
    Ok(Run {
        retval: attr.retval,
        packet: out,
        ns_per_run: attr.duration,
    })
}
