//! Builds the guest kernel image (a separate, `no_std` build with its own link flags) and
//! hands its path to `include_bytes!`, so that a plain `cargo build` of the VMM always
//! embeds a fresh guest.

use std::path::PathBuf;
use std::process::Command;

/// The guest kernel's target: bare metal, no OS (for the host target, wasmtime's
/// dependencies would pull `std` into the kernel).
const GUEST_TARGET: &str = "x86_64-unknown-none";
/// `-C` flags of the guest build. Static: the image is linked at fixed addresses.
///
/// Hard floats: the target is soft-float (its `core` passes floats in integer registers),
/// which makes wasmi emulate every float operation in software and, worse, breaks its
/// tail-call dispatch (its handlers take float registers: with soft floats they spill to
/// the stack, the sibling calls become real calls and the guest's stack overflows). So the
/// guest's own code uses SSE/SSE2 (baseline x86-64; the boot code enables SSE). rustc warns
/// that this disagrees with the target's ABI: the only calls that would disagree are calls
/// passing floats by value into the prebuilt `core`/`compiler_builtins`, and
/// [`check_float_abi`] refuses an image that links any of those.
const GUEST_RUSTFLAGS: &[&str] = &[
    "-Crelocation-model=static",
    "-Ctarget-feature=-soft-float,+sse,+sse2",
];

/// Functions of the prebuilt soft-float `compiler_builtins` that take or return floats by
/// value: a call from the hard-float guest code would pass its arguments in the wrong
/// registers. None may be linked into the image.
const SOFT_FLOAT_ABI_SYMBOLS: &[&str] = &[
    "floor",
    "floorf",
    "ceil",
    "ceilf",
    "trunc",
    "truncf",
    "round",
    "roundf",
    "rint",
    "rintf",
    "roundeven",
    "roundevenf",
    "sqrt",
    "sqrtf",
    "fmod",
    "fmodf",
    "fmin",
    "fminf",
    "fmax",
    "fmaxf",
    "fma",
    "fmaf",
    "copysign",
    "copysignf",
    "pow",
    "powf",
    "exp",
    "expf",
    "log",
    "logf",
    "sin",
    "cos",
    "__powidf2",
    "__powisf2",
    "__adddf3",
    "__addsf3",
    "__subdf3",
    "__subsf3",
    "__muldf3",
    "__mulsf3",
    "__divdf3",
    "__divsf3",
    "__extendsfdf2",
    "__truncdfsf2",
    "__floatdidf",
    "__floatundidf",
    "__floatdisf",
    "__floatundisf",
    "__fixdfdi",
    "__fixunsdfdi",
    "__fixsfdi",
    "__fixunssfdi",
    "__eqdf2",
    "__ltdf2",
    "__gtdf2",
    "__unorddf2",
];

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
            "--target",
            GUEST_TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .args(["--config", "profile.release.panic=\"abort\""])
        .env("CARGO_ENCODED_RUSTFLAGS", GUEST_RUSTFLAGS.join("\x1f"));
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
        panic!("building the guest kernel failed (see the output above); is the target installed (`rustup target add {GUEST_TARGET}`, which tools/setup.sh runs)? To build it alone: cargo build --release -p guest-kernel --features kernel --bin guest-kernel --target {GUEST_TARGET} --target-dir target/guest");
    }
    let image = target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join("guest-kernel");
    let elf = std::fs::read(&image).expect("read the guest kernel image");
    if let Err(e) = check_float_abi(&elf) {
        panic!("the guest kernel image {}: {e}", image.display());
    }
    std::fs::write(out.join("guest-kernel.elf"), &elf).expect("copy the guest kernel image");
}

/// Refuse an image whose code calls a soft-float ABI function (see [`GUEST_RUSTFLAGS`]).
/// Such functions may be linked without being called (they share an object file with
/// something the image needs), so what is checked is the calls: every `call`/`jmp rel32`
/// in the executable sections whose target is one of them. (A byte pattern scan: a false
/// alarm needs 4 bytes to match a target address by chance.)
fn check_float_abi(elf: &[u8]) -> Result<(), String> {
    let image = Elf::parse(elf).ok_or("cannot read its ELF section and symbol tables")?;
    let bad: Vec<(u64, &str)> = image
        .symbols
        .iter()
        .filter(|s| s.addr != 0 && SOFT_FLOAT_ABI_SYMBOLS.contains(&s.name.as_str()))
        .map(|s| (s.addr, s.name.as_str()))
        .collect();
    let mut called = Vec::new();
    let mut note = |site: u64, target: u64| {
        let Some((_, name)) = bad.iter().find(|(a, _)| *a == target) else {
            return;
        };
        // The prebuilt library calls its own functions with its own ABI, the guest's code
        // the functions it provides with its own: only calls across the two count.
        let caller = image.function_at(site).unwrap_or("");
        let prebuilt_caller = PREBUILT_CRATES.contains(&crate_of(caller));
        if prebuilt_caller != GUEST_PROVIDED.contains(name) {
            return;
        }
        if !called
            .iter()
            .any(|c: &String| c.starts_with(&format!("{name} ")))
        {
            called.push(format!("{name} (called from {caller})"));
        }
    };
    for (addr, bytes) in &image.code {
        for i in 0..bytes.len().saturating_sub(6) {
            let at =
                |k: usize| i32::from_le_bytes([bytes[k], bytes[k + 1], bytes[k + 2], bytes[k + 3]]);
            match bytes[i] {
                // call/jmp rel32
                0xe8 | 0xe9 => note(
                    addr + i as u64,
                    (addr + i as u64 + 5).wrapping_add(at(i + 1) as i64 as u64),
                ),
                // call/jmp [rip + disp32]: through a GOT slot holding the address
                0xff if bytes[i + 1] == 0x15 || bytes[i + 1] == 0x25 => {
                    let slot = (addr + i as u64 + 6).wrapping_add(at(i + 2) as i64 as u64);
                    if let Some(target) = image.read_u64(slot) {
                        note(addr + i as u64, target);
                    }
                }
                _ => {}
            }
        }
    }
    if called.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "its code calls {} across the float ABIs (the target's prebuilt library passes floats in integer registers, the guest's code in SSE registers): avoid the float operation that needs it, or provide a hard-float version in the guest (and keep the prebuilt library from calling it)",
            called.join(", ")
        ))
    }
}

/// Of those, the ones the guest defines itself with hardware floats (guest-kernel's
/// `arch/x86_64/mem.rs`): for them the wrong calls are the prebuilt library's.
const GUEST_PROVIDED: &[&str] = &["fmod", "fmodf"];

/// The crates whose code comes prebuilt for the target (soft-float ABI).
const PREBUILT_CRATES: &[&str] = &["core", "alloc", "compiler_builtins"];

/// The crate a mangled Rust symbol's path starts in (the first crate root of a v0 name
/// `_R...C[s<hash>_]<len><crate>...`, the first component of a legacy `_ZN<len><crate>`),
/// or "" for anything else.
fn crate_of(symbol: &str) -> &str {
    let ident = |s: &str| -> Option<usize> {
        let digits = s.bytes().take_while(u8::is_ascii_digit).count();
        let len: usize = s.get(..digits)?.parse().ok()?;
        s.get(digits..digits + len).map(|_| digits)
    };
    if let Some(rest) = symbol.strip_prefix("_ZN") {
        if let Some(d) = ident(rest) {
            let len: usize = rest[..d].parse().unwrap_or(0);
            return &rest[d..d + len];
        }
    } else if let Some(rest) = symbol.strip_prefix("_R") {
        let b = rest.as_bytes();
        for i in 0..b.len() {
            if b[i] != b'C' {
                continue;
            }
            let mut tail = &rest[i + 1..];
            if let Some(t) = tail.strip_prefix('s') {
                let Some(end) = t.find('_') else { continue };
                tail = &t[end + 1..];
            }
            if let Some(d) = ident(tail) {
                let len: usize = tail[..d].parse().unwrap_or(0);
                if len > 0 {
                    return &tail[d..d + len];
                }
            }
        }
    }
    ""
}

/// A `.symtab` entry.
struct Symbol {
    addr: u64,
    size: u64,
    name: String,
}

/// What [`check_float_abi`] needs of a little-endian ELF64 file.
struct Elf<'a> {
    symbols: Vec<Symbol>,
    /// (address, bytes) of every executable section.
    code: Vec<(u64, &'a [u8])>,
    /// (address, bytes) of every section with contents in the file.
    data: Vec<(u64, &'a [u8])>,
}

impl<'a> Elf<'a> {
    fn parse(b: &'a [u8]) -> Option<Self> {
        let u16_at = |o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
        let u32_at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
        let u64_at = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
        let shoff = u64_at(0x28)? as usize;
        let shentsize = u16_at(0x3a)? as usize;
        let shnum = u16_at(0x3c)? as usize;
        let section = |i: usize| shoff.checked_add(i.checked_mul(shentsize)?);
        let mut elf = Elf {
            symbols: Vec::new(),
            code: Vec::new(),
            data: Vec::new(),
        };
        for i in 0..shnum {
            let sh = section(i)?;
            let (kind, flags, addr) = (u32_at(sh + 4)?, u64_at(sh + 8)?, u64_at(sh + 0x10)?);
            let (off, size) = (u64_at(sh + 0x18)? as usize, u64_at(sh + 0x20)? as usize);
            let data = b.get(off..off.checked_add(size)?);
            if kind == 1 {
                // SHT_PROGBITS; SHF_EXECINSTR
                elf.data.push((addr, data?));
                if flags & 4 != 0 {
                    elf.code.push((addr, data?));
                }
            }
            if kind != 2 {
                continue; // not SHT_SYMTAB
            }
            let entsize = (u64_at(sh + 0x38)? as usize).max(24);
            let strtab = section(u32_at(sh + 0x28)? as usize)?;
            let str_off = u64_at(strtab + 0x18)? as usize;
            for s in (off..off.checked_add(size)?).step_by(entsize) {
                let start = str_off.checked_add(u32_at(s)? as usize)?;
                let len = b.get(start..)?.iter().position(|&c| c == 0)?;
                let name = String::from_utf8_lossy(&b[start..start + len]).into_owned();
                elf.symbols.push(Symbol {
                    addr: u64_at(s + 8)?,
                    size: u64_at(s + 16)?,
                    name,
                });
            }
        }
        Some(elf)
    }

    /// The name of the function whose code contains `addr`.
    fn function_at(&self, addr: u64) -> Option<&str> {
        self.symbols
            .iter()
            .find(|s| s.size > 0 && addr >= s.addr && addr - s.addr < s.size)
            .map(|s| s.name.as_str())
    }

    /// The 8 bytes at virtual address `addr`, if a section holds them.
    fn read_u64(&self, addr: u64) -> Option<u64> {
        let (start, bytes) = self
            .data
            .iter()
            .find(|(a, d)| addr >= *a && addr - a + 8 <= d.len() as u64)?;
        let off = (addr - start) as usize;
        Some(u64::from_le_bytes(bytes[off..off + 8].try_into().ok()?))
    }
}
