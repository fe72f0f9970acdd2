//! Builds the guest kernel image (a separate, `no_std` build with its own link flags) and
//! hands its path to `include_bytes!`, so that a plain `cargo build` of the VMM always
//! embeds a fresh guest.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    for dir in [
        "guest-kernel/src",
        "guest-kernel/Cargo.toml",
        "guest-kernel/build.rs",
        "guest-kernel/link.ld",
        "abi/src",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=VMM_GUEST_KERNEL");
    if std::env::var_os("VMM_GUEST_KERNEL").is_some() {
        // The kernel comes from $VMM_GUEST_KERNEL at run time; embed nothing.
        std::fs::write(out.join("guest-kernel.elf"), b"").expect("write placeholder");
        return;
    }
    let target_dir = root.join("target").join("guest");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args([
            "build",
            "--release",
            "-p",
            "guest-kernel",
            "--features",
            "kernel",
            "--bin",
            "guest-kernel",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .args(["--config", "profile.release.panic=\"abort\""])
        .env("CARGO_ENCODED_RUSTFLAGS", "-Crelocation-model=static");
    // Do not let the outer build's settings leak into the guest build.
    for var in [
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("run cargo to build the guest kernel");
    if !status.success() {
        panic!("building the guest kernel failed (see the output above); try: cargo build --release -p guest-kernel --features kernel --bin guest-kernel --target-dir target/guest");
    }
    let image = target_dir.join("release").join("guest-kernel");
    std::fs::copy(&image, out.join("guest-kernel.elf")).expect("copy the guest kernel image");
}
