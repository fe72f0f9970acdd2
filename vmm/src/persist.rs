//! The whole vCPU (and VM clock) state as one plain struct, and back.
//!
//! Captured: REGS, SREGS, XSAVE (which holds the FPU/SSE state), XCRS, VCPU_EVENTS,
//! DEBUGREGS, every MSR in KVM's index list that reads back, the back end's extra MSRs
//! (on PVM the VIF MSR, which is written back exactly as read, or the restored vCPU
//! silently runs emulated) and the KVM clock. Each KVM struct is kept as its raw bytes
//! (zerocopy: any byte pattern of these plain-integer structs is valid), and the whole
//! state is encoded with bincode under a size limit, so a damaged template is an error,
//! never a panic. [`VcpuState::validate`] refuses values this VMM never saves (a forged
//! or damaged state that KVM would take and the guest would crash on, or that KVM would
//! refuse with a bare errno), so restore and `vmm-store verify` can name them.

use crate::cpu::{GuestCpu, MadeOn, MadeOnMismatch};
use crate::platform::{Backend, MSR_PVM_VIF};
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, Msrs, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_abi::layout;
use zerocopy::{FromBytes, IntoBytes};

/// Bump when the encoding changes; older states are refused with a clear error.
pub const VCPU_STATE_VERSION: u32 = 1;
const MAX_STATE_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, bincode::Encode, bincode::Decode)]
pub struct VcpuState {
    pub version: u32,
    /// The back end and CPU it was made on ([`MadeOn::record`]).
    pub backend: String,
    pub tsc_khz: u64,
    pub regs: Vec<u8>,
    pub sregs: Vec<u8>,
    pub xsave: Vec<u8>,
    pub xcrs: Vec<u8>,
    pub events: Vec<u8>,
    pub debugregs: Vec<u8>,
    pub msrs: Vec<(u32, u64)>,
    pub clock: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("save the vCPU state ({step}): {source}")]
    Save {
        step: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("restore the vCPU state ({step}): {source}")]
    Restore {
        step: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("restore MSR {index:#x}: KVM refused it")]
    Msr { index: u32 },
    #[error("the vCPU state is damaged ({0}); recreate the template")]
    Damaged(String),
    /// A value this VMM never saves: the state was damaged or forged.
    #[error("the vCPU state holds {what} {value}, which this vmm never saves ({why}); the template is damaged or forged: recreate it")]
    Invalid {
        what: &'static str,
        value: String,
        why: String,
    },
    #[error("the vCPU state has version {0}, this vmm reads version {VCPU_STATE_VERSION}; recreate the template")]
    Version(u32),
    #[error(transparent)]
    MadeOn(#[from] MadeOnMismatch),
}

fn save<T>(step: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, PersistError> {
    r.map_err(|source| PersistError::Save { step, source })
}
fn restore(step: &'static str, r: Result<(), kvm_ioctls::Error>) -> Result<(), PersistError> {
    r.map_err(|source| PersistError::Restore { step, source })
}

fn read<T: FromBytes>(what: &str, b: &[u8]) -> Result<T, PersistError> {
    T::read_from_bytes(b).map_err(|_| {
        PersistError::Damaged(format!(
            "{what} are {} bytes, not {}",
            b.len(),
            std::mem::size_of::<T>()
        ))
    })
}

fn invalid(what: &'static str, value: impl Into<String>, why: impl Into<String>) -> PersistError {
    PersistError::Invalid {
        what,
        value: value.into(),
        why: why.into(),
    }
}

/// MSR IA32_EFER (also in the special registers).
const MSR_EFER: u32 = 0xc000_0080;
const CR0_PE: u64 = 1;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_FIXED: u64 = 1 << 1;
const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_VM: u64 = 1 << 17;
/// RFLAGS bits 22..63 are reserved (zero).
const RFLAGS_RESERVED: u64 = !((1 << 22) - 1);
/// DR7: the eight breakpoint enable bits and general detect.
const DR7_ENABLES: u64 = 0xff | (1 << 13);
/// The XSAVE components whose state lies in the 4 KiB area KVM_GET_XSAVE fills: x87, SSE,
/// AVX, MPX (2), AVX-512 (3) and PKRU.
const XSAVE_AREA_COMPONENTS: u64 = 0x2ff;

/// Read as many of `indices` as KVM allows, skipping the ones it refuses.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Vec<(u32, u64)> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let Ok(mut msrs) = Msrs::from_entries(&entries) else {
            break;
        };
        let n = vcpu.get_msrs(&mut msrs).unwrap_or(0);
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // KVM stops at the first MSR it cannot read: skip that one and go on.
        rest = &rest[(n + 1).min(rest.len())..];
    }
    out
}

impl VcpuState {
    /// Capture the vCPU and clock state. The vCPU must be stopped at an exit whose I/O has
    /// been completed (see `Vm::settle`).
    pub fn capture(
        kvm: &Kvm,
        vm: &VmFd,
        vcpu: &VcpuFd,
        cpu: &GuestCpu,
        tsc_khz: u64,
    ) -> Result<Self, PersistError> {
        let backend = cpu.backend();
        let regs = save("KVM_GET_REGS", vcpu.get_regs())?;
        let sregs = save("KVM_GET_SREGS", vcpu.get_sregs())?;
        let xsave = save("KVM_GET_XSAVE", vcpu.get_xsave())?;
        let xcrs = save("KVM_GET_XCRS", vcpu.get_xcrs())?;
        let events = save("KVM_GET_VCPU_EVENTS", vcpu.get_vcpu_events())?;
        let debugregs = save("KVM_GET_DEBUGREGS", vcpu.get_debug_regs())?;
        let mut indices: Vec<u32> = save("KVM_GET_MSR_INDEX_LIST", kvm.get_msr_index_list())?
            .as_slice()
            .to_vec();
        indices.extend_from_slice(backend.extra_msrs());
        let msrs = read_msrs(vcpu, &indices);
        for &extra in backend.extra_msrs() {
            if !msrs.iter().any(|&(i, _)| i == extra) {
                return Err(PersistError::Save {
                    step: "read the back end's MSRs",
                    source: kvm_ioctls::Error::new(libc::EIO),
                });
            }
        }
        let clock = save("KVM_GET_CLOCK", vm.get_clock())?;
        Ok(VcpuState {
            version: VCPU_STATE_VERSION,
            backend: cpu.record(),
            tsc_khz,
            regs: regs.as_bytes().to_vec(),
            sregs: sregs.as_bytes().to_vec(),
            xsave: xsave.as_bytes().to_vec(),
            xcrs: xcrs.as_bytes().to_vec(),
            events: events.as_bytes().to_vec(),
            debugregs: debugregs.as_bytes().to_vec(),
            msrs,
            clock: clock.as_bytes().to_vec(),
        })
    }

    /// Write the state into a fresh vCPU of a fresh VM (or one being reset in place), whose
    /// guest CPU model is `cpu`: refused when the model the state was made on has a feature
    /// a guest may use that `cpu` lacks.
    pub fn apply(&self, vm: &VmFd, vcpu: &VcpuFd, cpu: &GuestCpu) -> Result<(), PersistError> {
        let backend = cpu.backend();
        self.made_on()?.check_restore(cpu.made_on())?;
        let sregs: kvm_sregs = read("sregs", &self.sregs)?;
        let regs: kvm_regs = read("regs", &self.regs)?;
        let xsave: kvm_xsave = read("xsave", &self.xsave)?;
        let xcrs: kvm_xcrs = read("xcrs", &self.xcrs)?;
        let events: kvm_vcpu_events = read("vcpu events", &self.events)?;
        let debugregs: kvm_debugregs = read("debugregs", &self.debugregs)?;
        let clock: kvm_clock_data = read("clock", &self.clock)?;
        restore("KVM_SET_SREGS", vcpu.set_sregs(&sregs))?;
        // SAFETY: `xsave` is a complete kvm_xsave read from bytes of its exact size;
        // KVM validates the contents and fails the ioctl on an invalid header.
        restore("KVM_SET_XSAVE", unsafe { vcpu.set_xsave(&xsave) })?;
        restore("KVM_SET_XCRS", vcpu.set_xcrs(&xcrs))?;
        restore("KVM_SET_REGS", vcpu.set_regs(&regs))?;
        restore("KVM_SET_VCPU_EVENTS", vcpu.set_vcpu_events(&events))?;
        restore("KVM_SET_DEBUGREGS", vcpu.set_debug_regs(&debugregs))?;
        // MSRs: write them all at once; KVM stops at the first it refuses, which is
        // skipped. The back end's own MSRs (PVM VIF) come last, in `apply_backend_msrs`,
        // because KVM checks them against guest memory, which may not be registered yet.
        let extra = backend.extra_msrs();
        let msrs: Vec<(u32, u64)> = self
            .msrs
            .iter()
            .copied()
            .filter(|(i, _)| !extra.contains(i))
            .collect();
        let mut rest: &[(u32, u64)] = &msrs;
        while !rest.is_empty() {
            let entries: Vec<kvm_msr_entry> = rest
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries).map_err(|_| too_many_msrs(entries.len()))?;
            let n = vcpu.set_msrs(&msrs).unwrap_or(0);
            rest = &rest[(n + 1).min(rest.len())..];
        }
        let clock = kvm_clock_data { flags: 0, ..clock };
        restore("KVM_SET_CLOCK", vm.set_clock(&clock))?;
        Ok(())
    }

    /// Write the back end's own MSRs exactly as saved (PVM: the VIF page; without it the
    /// restored vCPU silently runs emulated). Call after guest memory is registered.
    pub fn apply_backend_msrs(&self, vcpu: &VcpuFd, backend: Backend) -> Result<(), PersistError> {
        for &index in backend.extra_msrs() {
            let data = self
                .msrs
                .iter()
                .find(|&&(i, _)| i == index)
                .map(|&(_, d)| d)
                .ok_or_else(|| PersistError::Damaged(format!("MSR {index:#x} missing")))?;
            let msrs = Msrs::from_entries(&[kvm_msr_entry {
                index,
                data,
                ..Default::default()
            }])
            .map_err(|_| too_many_msrs(1))?;
            if vcpu.set_msrs(&msrs).unwrap_or(0) != 1 {
                return Err(PersistError::Msr { index });
            }
        }
        Ok(())
    }

    /// The back end and CPU the state was made on (its `backend` record).
    pub fn made_on(&self) -> Result<MadeOn, PersistError> {
        MadeOn::parse(&self.backend)
            .map_err(|why| invalid("back end", crate::text::shown(&self.backend), why))
    }

    pub fn encode(&self) -> Vec<u8> {
        bincode::encode_to_vec(self, bincode::config::standard()).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, PersistError> {
        let cfg = bincode::config::standard().with_limit::<MAX_STATE_BYTES>();
        let (state, used): (VcpuState, usize) = bincode::decode_from_slice(bytes, cfg)
            .map_err(|e| PersistError::Damaged(crate::text::decode_error_text(&e)))?;
        if used != bytes.len() {
            return Err(PersistError::Damaged(format!(
                "{} bytes follow its end",
                bytes.len() - used
            )));
        }
        if state.version != VCPU_STATE_VERSION {
            return Err(PersistError::Version(state.version));
        }
        Ok(state)
    }
}

fn too_many_msrs(n: usize) -> PersistError {
    invalid(
        "a list of",
        format!("{n} MSRs"),
        format!("KVM takes at most {KVM_MAX_MSR_ENTRIES}"),
    )
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

impl VcpuState {
    /// Refuse values this VMM never saves for a guest of `mem_size` bytes: the vCPU is
    /// always stopped at a hostcall in the guest kernel, in 64-bit mode on the VMM's
    /// identity page tables, on the kernel stack, with no event pending (the layout is
    /// the ABI's). Checked without KVM, so `vmm-store verify` runs the same checks as
    /// restore. KVM still validates what it takes; this catches what it would take and
    /// the guest would crash on, and names what it would refuse with a bare errno.
    pub fn validate(&self, mem_size: u64) -> Result<(), PersistError> {
        let made_on = self.made_on()?;
        if self.tsc_khz == 0 || self.tsc_khz > 100_000_000 {
            return Err(invalid(
                "TSC frequency",
                format!("{} kHz", self.tsc_khz),
                "a CPU clock between 1 kHz and 100 GHz",
            ));
        }
        let regs: kvm_regs = read("regs", &self.regs)?;
        let sregs: kvm_sregs = read("sregs", &self.sregs)?;
        let xsave: kvm_xsave = read("xsave", &self.xsave)?;
        let xcrs: kvm_xcrs = read("xcrs", &self.xcrs)?;
        let events: kvm_vcpu_events = read("vcpu events", &self.events)?;
        let debugregs: kvm_debugregs = read("debugregs", &self.debugregs)?;
        let _: kvm_clock_data = read("clock", &self.clock)?;

        let kernel = layout::KERNEL_BASE..layout::KERNEL_END_MAX;
        if !kernel.contains(&regs.rip) {
            return Err(invalid(
                "rip",
                hex(regs.rip),
                format!(
                    "the guest kernel's code is at {:#x}..{:#x}",
                    kernel.start, kernel.end
                ),
            ));
        }
        if !(layout::STACK_BOTTOM..=layout::STACK_TOP).contains(&regs.rsp) {
            return Err(invalid(
                "rsp",
                hex(regs.rsp),
                format!(
                    "the guest kernel's stack is at {:#x}..{:#x}",
                    layout::STACK_BOTTOM,
                    layout::STACK_TOP
                ),
            ));
        }
        let f = regs.rflags;
        if f & RFLAGS_FIXED == 0 || f & (RFLAGS_TF | RFLAGS_VM | RFLAGS_RESERVED) != 0 {
            return Err(invalid(
                "rflags",
                hex(f),
                "bit 1 set; no trap flag, virtual-8086 mode or reserved bits",
            ));
        }

        // Long mode on the VMM's identity page tables.
        if sregs.cr0 & (CR0_PE | CR0_PG) != CR0_PE | CR0_PG {
            return Err(invalid("cr0", hex(sregs.cr0), "protection and paging on"));
        }
        if sregs.cr4 & CR4_PAE == 0 {
            return Err(invalid("cr4", hex(sregs.cr4), "PAE on"));
        }
        if sregs.efer & (EFER_LME | EFER_LMA) != EFER_LME | EFER_LMA {
            return Err(invalid("efer", hex(sregs.efer), "long mode on"));
        }
        if sregs.cr3 != layout::PML4_GPA {
            return Err(invalid(
                "cr3",
                hex(sregs.cr3),
                format!("the guest's page tables are at {:#x}", layout::PML4_GPA),
            ));
        }
        if sregs.cs.l != 1 || sregs.cs.present != 1 {
            return Err(invalid(
                "code segment",
                format!("selector {:#x}", sregs.cs.selector),
                "a present 64-bit code segment",
            ));
        }
        let in_ram = |base: u64, limit: u64| base.checked_add(limit).is_some_and(|e| e < mem_size);
        let ram = format!("inside the {} MiB of guest memory", mem_size >> 20);
        if !in_ram(sregs.gdt.base, sregs.gdt.limit.into()) {
            return Err(invalid("gdt base", hex(sregs.gdt.base), ram));
        }
        if !in_ram(sregs.idt.base, sregs.idt.limit.into()) {
            return Err(invalid("idt base", hex(sregs.idt.base), ram));
        }
        if sregs.tr.present != 1 || !in_ram(sregs.tr.base, sregs.tr.limit.into()) {
            return Err(invalid("task state segment at", hex(sregs.tr.base), ram));
        }
        if sregs.interrupt_bitmap.iter().any(|&w| w != 0) {
            return Err(invalid(
                "a pending interrupt",
                "in the interrupt bitmap",
                "the guest has no interrupt sources",
            ));
        }

        // Nothing pending: the vCPU stopped at a hostcall, not in the middle of an event.
        let ev = &events;
        if ev.exception.injected != 0 || ev.exception.pending != 0 {
            return Err(invalid(
                "a pending exception",
                format!("(vector {})", ev.exception.nr),
                "the vCPU is saved at a hostcall, with no exception under way",
            ));
        }
        if ev.interrupt.injected != 0
            || ev.nmi.injected != 0
            || ev.nmi.pending != 0
            || ev.smi.smm != 0
            || ev.smi.pending != 0
            || ev.triple_fault.pending != 0
        {
            return Err(invalid(
                "a pending event",
                "(interrupt, NMI, SMI or triple fault)",
                "the vCPU is saved at a hostcall, with no event under way",
            ));
        }
        if debugregs.dr7 & DR7_ENABLES != 0 {
            return Err(invalid(
                "dr7",
                hex(debugregs.dr7),
                "no hardware breakpoint enabled",
            ));
        }

        // Extended state: XCR0 always enables x87; the XSAVE header is the standard
        // (uncompacted) one KVM_GET_XSAVE returns.
        let n = xcrs.nr_xcrs as usize;
        if n > xcrs.xcrs.len() {
            return Err(invalid(
                "xcrs count",
                n.to_string(),
                format!("KVM has at most {}", xcrs.xcrs.len()),
            ));
        }
        let xcr0 = xcrs.xcrs[..n].iter().find(|x| x.xcr == 0).map(|x| x.value);
        if xcr0.is_some_and(|v| v & 1 == 0) {
            return Err(invalid("xcr0", hex(xcr0.unwrap_or(0)), "x87 state enabled"));
        }
        let x = xsave.region.as_bytes();
        let word = |o: usize| u64::from_le_bytes(x[o..o + 8].try_into().unwrap_or([0; 8]));
        let mxcsr = word(24) & 0xffff_ffff;
        if mxcsr >> 16 != 0 {
            return Err(invalid("xsave MXCSR", hex(mxcsr), "reserved bits clear"));
        }
        // XSTATE_BV names components of the 4 KiB area only, not only those XCR0 enables:
        // hardware KVM reports the vCPU's PKRU, and AVX state when the CPU marks it in use,
        // whatever the guest's XCR0 (an emulated AMD CPU, XCR0 0x1: XSTATE_BV 0x207).
        let (xstate_bv, xcomp_bv) = (word(512), word(520));
        if xstate_bv & !XSAVE_AREA_COMPONENTS != 0 || xcomp_bv != 0 {
            return Err(invalid(
                "xsave header",
                format!("XSTATE_BV {xstate_bv:#x}, XCOMP_BV {xcomp_bv:#x}"),
                "the standard format naming only x87, SSE, AVX, MPX, AVX-512 or PKRU state",
            ));
        }
        if x[528..576].iter().any(|&b| b != 0) {
            return Err(invalid(
                "xsave header",
                "with reserved bytes set",
                "they are zero",
            ));
        }

        // MSRs: as many as KVM takes; EFER (if listed) agrees with the special registers;
        // on PVM the VIF page is the one the ABI places.
        if self.msrs.len() > KVM_MAX_MSR_ENTRIES {
            return Err(too_many_msrs(self.msrs.len()));
        }
        if let Some(&(_, efer)) = self.msrs.iter().find(|(i, _)| *i == MSR_EFER) {
            if efer != sregs.efer {
                return Err(invalid(
                    "MSR EFER",
                    hex(efer),
                    format!("the same as the special registers' {:#x}", sregs.efer),
                ));
            }
        }
        if made_on.backend == Backend::Pvm {
            let vif = MSR_PVM_VIF;
            match self.msrs.iter().find(|(i, _)| *i == vif) {
                None => return Err(PersistError::Damaged(format!("MSR {vif:#x} is missing"))),
                Some(&(_, v)) if v & !0xfff != layout::VIF_GPA => {
                    return Err(invalid(
                        "PVM VIF page",
                        hex(v),
                        format!("the ABI places it at {:#x}", layout::VIF_GPA),
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM: u64 = 64 << 20;

    /// A state that passes every check (a runtime base made on PVM).
    fn valid() -> VcpuState {
        VcpuState::decode(&crate::template::checks::fixtures::states(MEM, None).0).unwrap()
    }

    /// `valid()` with one KVM struct changed by `f`.
    fn with<T: FromBytes + IntoBytes + zerocopy::Immutable>(
        field: fn(&mut VcpuState) -> &mut Vec<u8>,
        f: impl FnOnce(&mut T),
    ) -> VcpuState {
        let mut s = valid();
        let mut v: T = read("test", field(&mut s)).unwrap();
        f(&mut v);
        *field(&mut s) = v.as_bytes().to_vec();
        s
    }
    fn regs(f: impl FnOnce(&mut kvm_regs)) -> VcpuState {
        with(|s| &mut s.regs, f)
    }
    fn sregs(f: impl FnOnce(&mut kvm_sregs)) -> VcpuState {
        with(|s| &mut s.sregs, f)
    }
    fn events(f: impl FnOnce(&mut kvm_vcpu_events)) -> VcpuState {
        with(|s| &mut s.events, f)
    }

    /// The name of the value `s.validate(MEM)` refuses (panics if it accepts it or fails
    /// otherwise).
    fn refused(s: &VcpuState) -> &'static str {
        match s.validate(MEM) {
            Err(PersistError::Invalid { what, .. }) => what,
            other => panic!("expected an invalid value, got {other:?}"),
        }
    }

    #[test]
    fn the_fixture_is_valid() {
        valid().validate(MEM).unwrap();
        // Boundaries that are still accepted.
        regs(|r| r.rip = layout::KERNEL_END_MAX - 1)
            .validate(MEM)
            .unwrap();
        regs(|r| r.rsp = layout::STACK_TOP).validate(MEM).unwrap();
        regs(|r| r.rsp = layout::STACK_BOTTOM)
            .validate(MEM)
            .unwrap();
        sregs(|s| s.gdt.base = MEM - 1 - u64::from(s.gdt.limit))
            .validate(MEM)
            .unwrap();
    }

    #[test]
    fn general_registers_outside_the_kernel_are_refused() {
        assert_eq!(refused(&regs(|r| r.rip = layout::KERNEL_BASE - 1)), "rip");
        assert_eq!(refused(&regs(|r| r.rip = layout::KERNEL_END_MAX)), "rip");
        assert_eq!(refused(&regs(|r| r.rsp = layout::STACK_BOTTOM - 1)), "rsp");
        assert_eq!(refused(&regs(|r| r.rsp = layout::STACK_TOP + 1)), "rsp");
        assert_eq!(refused(&regs(|r| r.rflags = 0)), "rflags");
        assert_eq!(refused(&regs(|r| r.rflags = 2 | RFLAGS_TF)), "rflags");
        assert_eq!(refused(&regs(|r| r.rflags = 2 | RFLAGS_VM)), "rflags");
        assert_eq!(refused(&regs(|r| r.rflags = 2 | (1 << 22))), "rflags");
    }

    #[test]
    fn special_registers_must_be_long_mode_on_the_vmm_page_tables() {
        assert_eq!(refused(&sregs(|s| s.cr0 &= !CR0_PG)), "cr0");
        assert_eq!(refused(&sregs(|s| s.cr0 &= !CR0_PE)), "cr0");
        assert_eq!(refused(&sregs(|s| s.cr4 &= !CR4_PAE)), "cr4");
        assert_eq!(refused(&sregs(|s| s.efer &= !EFER_LMA)), "efer");
        assert_eq!(
            refused(&sregs(|s| s.cr3 = layout::PML4_GPA + 0x1000)),
            "cr3"
        );
        assert_eq!(refused(&sregs(|s| s.cs.l = 0)), "code segment");
        assert_eq!(refused(&sregs(|s| s.cs.present = 0)), "code segment");
        // Descriptor tables end inside guest RAM.
        assert_eq!(
            refused(&sregs(|s| s.gdt.base = MEM - u64::from(s.gdt.limit))),
            "gdt base"
        );
        assert_eq!(refused(&sregs(|s| s.idt.base = u64::MAX)), "idt base");
        assert_eq!(
            refused(&sregs(|s| s.tr.present = 0)),
            "task state segment at"
        );
        assert_eq!(
            refused(&sregs(|s| s.interrupt_bitmap[3] = 1 << 5)),
            "a pending interrupt"
        );
    }

    #[test]
    fn nothing_may_be_pending() {
        assert_eq!(
            refused(&events(|e| e.exception.pending = 1)),
            "a pending exception"
        );
        assert_eq!(
            refused(&events(|e| e.exception.injected = 1)),
            "a pending exception"
        );
        let forged: [fn(&mut kvm_vcpu_events); 4] = [
            |e| e.interrupt.injected = 1,
            |e| e.nmi.pending = 1,
            |e| e.smi.smm = 1,
            |e| e.triple_fault.pending = 1,
        ];
        for f in forged {
            assert_eq!(refused(&events(f)), "a pending event");
        }
        let s = with(
            |s| &mut s.debugregs,
            |d: &mut kvm_debugregs| d.dr7 |= 1 << 2,
        );
        assert_eq!(refused(&s), "dr7");
    }

    #[test]
    fn clock_extended_state_and_msrs_are_checked() {
        let mut s = valid();
        s.tsc_khz = 0;
        assert_eq!(refused(&s), "TSC frequency");
        let s = with(|s| &mut s.xcrs, |x: &mut kvm_xcrs| x.xcrs[0].value = 0x6);
        assert_eq!(refused(&s), "xcr0");
        // MSR EFER agrees with the special registers' EFER (0x500 in the fixture).
        let mut s = valid();
        s.msrs.push((MSR_EFER, 0x500));
        s.validate(MEM).unwrap();
        s.msrs.last_mut().unwrap().1 = 0x501;
        assert_eq!(refused(&s), "MSR EFER");
        // On PVM the VIF page is the ABI's, and the MSR must be there.
        let mut s = valid();
        s.msrs[0].1 = layout::VIF_GPA + 0x1000;
        assert_eq!(refused(&s), "PVM VIF page");
        s.msrs.clear();
        assert!(matches!(s.validate(MEM), Err(PersistError::Damaged(_))));
        // A hardware-made state needs no VIF MSR.
        s.backend = "hardware".into();
        s.validate(MEM).unwrap();
    }

    #[test]
    fn damaged_encodings_are_errors() {
        let mut s = valid();
        s.regs.pop();
        assert!(matches!(s.validate(MEM), Err(PersistError::Damaged(_))));
        let mut s = valid();
        s.backend = "vmx".into();
        assert_eq!(refused(&s), "back end");
        let mut bytes = valid().encode();
        bytes.push(0);
        assert!(matches!(
            VcpuState::decode(&bytes),
            Err(PersistError::Damaged(_))
        ));
        let mut s = valid();
        s.version = VCPU_STATE_VERSION + 1;
        assert!(matches!(
            VcpuState::decode(&s.encode()),
            Err(PersistError::Version(v)) if v == VCPU_STATE_VERSION + 1
        ));
    }
}
