//! The whole vCPU (and VM clock) state as one plain struct, and back.
//!
//! Captured: REGS, SREGS, XSAVE (which holds the FPU/SSE state), XCRS, VCPU_EVENTS,
//! DEBUGREGS, every MSR in KVM's index list that reads back, the back end's extra MSRs
//! (on PVM the VIF MSR, which is written back exactly as read, or the restored vCPU
//! silently runs emulated) and the KVM clock. Each KVM struct is kept as its raw bytes
//! (zerocopy: any byte pattern of these plain-integer structs is valid), and the whole
//! state is encoded with bincode under a size limit, so a damaged template is an error,
//! never a panic.

use crate::platform::Backend;
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use zerocopy::{FromBytes, IntoBytes};

/// Bump when the encoding changes; older states are refused with a clear error.
pub const VCPU_STATE_VERSION: u32 = 1;
const MAX_STATE_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, bincode::Encode, bincode::Decode)]
pub struct VcpuState {
    pub version: u32,
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
    #[error("the template's vCPU state is damaged ({0}); recreate the template")]
    Damaged(String),
    #[error("the template's vCPU state has version {0}, this vmm reads version {VCPU_STATE_VERSION}; recreate the template")]
    Version(u32),
    #[error("the template was made on {made} KVM and cannot be restored on {here} KVM; create it on this machine")]
    Backend { made: String, here: String },
}

fn save<T>(step: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, PersistError> {
    r.map_err(|source| PersistError::Save { step, source })
}
fn restore(step: &'static str, r: Result<(), kvm_ioctls::Error>) -> Result<(), PersistError> {
    r.map_err(|source| PersistError::Restore { step, source })
}

fn read<T: FromBytes>(what: &str, b: &[u8]) -> Result<T, PersistError> {
    T::read_from_bytes(b).map_err(|_| PersistError::Damaged(format!("{what}: {} bytes", b.len())))
}

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
        backend: Backend,
        tsc_khz: u64,
    ) -> Result<Self, PersistError> {
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
            backend: format!("{backend:?}").to_lowercase(),
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

    /// Write the state into a fresh vCPU of a fresh VM.
    pub fn apply(&self, vm: &VmFd, vcpu: &VcpuFd, backend: Backend) -> Result<(), PersistError> {
        let here = format!("{backend:?}").to_lowercase();
        if self.backend != here {
            return Err(PersistError::Backend {
                made: self.backend.clone(),
                here,
            });
        }
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
            let msrs = Msrs::from_entries(&entries)
                .map_err(|e| PersistError::Damaged(format!("MSR list: {e:?}")))?;
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
            .map_err(|e| PersistError::Damaged(format!("MSR list: {e:?}")))?;
            if vcpu.set_msrs(&msrs).unwrap_or(0) != 1 {
                return Err(PersistError::Msr { index });
            }
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        bincode::encode_to_vec(self, bincode::config::standard()).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, PersistError> {
        let cfg = bincode::config::standard().with_limit::<MAX_STATE_BYTES>();
        let (state, used): (VcpuState, usize) = bincode::decode_from_slice(bytes, cfg)
            .map_err(|e| PersistError::Damaged(e.to_string()))?;
        if used != bytes.len() {
            return Err(PersistError::Damaged("trailing bytes".into()));
        }
        if state.version != VCPU_STATE_VERSION {
            return Err(PersistError::Version(state.version));
        }
        Ok(state)
    }
}
