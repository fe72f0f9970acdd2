//! Everything specific to the KVM back end this VMM runs on, detected at start-up.
//!
//! On the machines this project is developed on, `/dev/kvm` is the paravirtual `kvm_pvm`
//! back end (shadow paging, the guest runs at hardware CPL3). A guest runs natively there
//! only if its "VIF" page is registered through MSR 0x4b564d10 before the first KVM_RUN;
//! nothing reports an error otherwise, every instruction is just emulated 3000x slower.
//! On ordinary hardware KVM (VT-x/AMD-V) none of that applies. This module and the guest
//! CPU model (`crate::cpu`, which differs per back end) are the only places that know the
//! difference.
//!
//! What a template was made on (the back end and the guest's CPU) is `crate::cpu`'s.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;
use vmm_abi::layout;

/// PVM: the guest's virtual-interrupt-flag page; host writes must set bit 10.
pub const MSR_PVM_VIF: u32 = 0x4b56_4d10;
const PVM_VIF_HOST_WRITE: u64 = 0x400;
/// PVM: reads 0x4d5650 ("PVM") on the PVM back end.
const MSR_PVM_SIGNATURE: u32 = 0x4b56_4d11;
const PVM_SIGNATURE: u64 = 0x4d_5650;
/// PVM: the TSC frequency in kHz.
const MSR_PVM_TSC_KHZ: u32 = 0x4b56_4d13;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The paravirtual `kvm_pvm` back end.
    Pvm,
    /// Ordinary hardware-assisted KVM.
    Hardware,
}

#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("register the PVM VIF page (KVM_SET_MSRS {MSR_PVM_VIF:#x}): {0}; the guest would run emulated")]
    Vif(String),
    #[error("set the vCPU's CPUID (KVM_SET_CPUID2, or read KVM_GET_SUPPORTED_CPUID): {0}")]
    Cpuid(kvm_ioctls::Error),
    #[error("the guest CPU model: {0}")]
    CpuModel(String),
    #[error("read the guest TSC frequency: {0}")]
    TscKhz(String),
}

fn read_msr(vcpu: &VcpuFd, index: u32) -> Option<u64> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .ok()?;
    match vcpu.get_msrs(&mut msrs) {
        Ok(1) => Some(msrs.as_slice()[0].data),
        _ => None,
    }
}

fn write_msr(vcpu: &VcpuFd, index: u32, data: u64) -> Result<(), String> {
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }])
    .map_err(|e| format!("{e:?}"))?;
    match vcpu.set_msrs(&msrs) {
        Ok(1) => Ok(()),
        Ok(n) => Err(format!("KVM accepted {n} of 1 MSRs")),
        Err(e) => Err(e.to_string()),
    }
}

impl Backend {
    /// Tell the back ends apart with a vCPU of a fresh VM: only PVM answers its signature MSR.
    pub fn detect(vcpu: &VcpuFd) -> Backend {
        match read_msr(vcpu, MSR_PVM_SIGNATURE) {
            Some(PVM_SIGNATURE) => Backend::Pvm,
            _ => Backend::Hardware,
        }
    }

    /// Prepare a freshly created vCPU for a boot (not for a restore, which writes the
    /// saved MSRs back instead), after the guest CPU model's CPUID table is set
    /// ([`crate::cpu::GuestCpu::set_on`]): PVM's VIF page.
    pub fn setup_vcpu(self, vcpu: &VcpuFd) -> Result<(), PlatformError> {
        match self {
            Backend::Pvm => write_msr(vcpu, MSR_PVM_VIF, layout::VIF_GPA | PVM_VIF_HOST_WRITE)
                .map_err(PlatformError::Vif),
            Backend::Hardware => Ok(()),
        }
    }

    /// MSRs that are not in KVM's index list but are part of a vCPU's state here.
    pub fn extra_msrs(self) -> &'static [u32] {
        match self {
            Backend::Pvm => &[MSR_PVM_VIF],
            Backend::Hardware => &[],
        }
    }

    /// The vCPU's time stamp counter now (IA32_TSC as the guest reads it), if KVM says.
    pub fn guest_tsc(self, vcpu: &VcpuFd) -> Option<u64> {
        const MSR_IA32_TSC: u32 = 0x10;
        read_msr(vcpu, MSR_IA32_TSC)
    }

    /// The guest TSC frequency in kHz.
    pub fn tsc_khz(self, vcpu: &VcpuFd) -> Result<u64, PlatformError> {
        if let Ok(khz) = vcpu.get_tsc_khz() {
            if khz > 0 {
                return Ok(khz as u64);
            }
        }
        if self == Backend::Pvm {
            if let Some(khz) = read_msr(vcpu, MSR_PVM_TSC_KHZ).filter(|&k| k > 0) {
                return Ok(khz);
            }
        }
        Err(PlatformError::TscKhz(
            "KVM_GET_TSC_KHZ failed and no fallback applies".into(),
        ))
    }
}

impl Backend {
    /// `pvm` or `hardware`, as records and messages name the back end.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Pvm => "pvm",
            Backend::Hardware => "hardware",
        }
    }
}
