//! Link options for the eBPF object.

fn main() {
    // bpf-linker asks LLVM to expand memcpy "in order" by default, which
    // turns every other memory intrinsic (memset, memmove) into a call to
    // a byte-at-a-time loop: zeroing a key or copying a record cost a
    // subprogram call and a loop per byte. Without it, LLVM expands every
    // fixed-size intrinsic into word loads and stores.
    println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
}
