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

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

/// The first members of `union bpf_attr` for BPF_PROG_LOAD; the kernel
/// takes the rest as zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// Loads a TC program that does nothing (`r0 = 0; exit`): the test run's
/// own cost per packet, to set beside a real program's in the same run.
pub fn empty_classifier() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // mov64 r0, 0; exit
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 0, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = b"GPL\0";
    let mut name = [0u8; 16];
    name[..5].copy_from_slice(b"empty");
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        ..Default::default()
    };
    // SAFETY: attr is a fully initialised repr(C) struct whose pointers
    // outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}
