//! Link flags for the kernel image. Only with `--features kernel`: the library (and its
//! host tests) are built as ordinary Rust. The image is linked by rust-lld (the
//! `x86_64-unknown-none` target's linker), so these are plain `ld` flags.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link.ld");
    if std::env::var_os("CARGO_FEATURE_KERNEL").is_none() {
        return;
    }
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    for arg in [
        "--static",
        "--no-pie",
        "--build-id=none",
        "--gc-sections",
        "-znoexecstack",
        "-T",
        &format!("{dir}/link.ld"),
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
