//! The ioctl request numbers the filters allow, computed the way `<asm/ioctl.h>` does
//! from the structures' sizes (so they match the kernel headers kvm-bindings mirrors).

use kvm_bindings::*;
use std::mem::size_of;

const KVMIO: u64 = 0xAE;
const UFFDIO: u64 = 0xAA;

const fn io(ty: u64, nr: u64) -> u64 {
    (ty << 8) | nr
}
const fn ior(ty: u64, nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
const fn iow(ty: u64, nr: u64, size: usize) -> u64 {
    (1 << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
const fn iowr(ty: u64, nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (ty << 8) | nr
}

// /dev/kvm
pub const KVM_GET_API_VERSION: u64 = io(KVMIO, 0x00);
pub const KVM_CREATE_VM: u64 = io(KVMIO, 0x01);
pub const KVM_GET_MSR_INDEX_LIST: u64 = iowr(KVMIO, 0x02, size_of::<kvm_msr_list>());
pub const KVM_CHECK_EXTENSION: u64 = io(KVMIO, 0x03);
pub const KVM_GET_VCPU_MMAP_SIZE: u64 = io(KVMIO, 0x04);
pub const KVM_GET_SUPPORTED_CPUID: u64 = iowr(KVMIO, 0x05, size_of::<kvm_cpuid2>());
// VM
pub const KVM_CREATE_VCPU: u64 = io(KVMIO, 0x41);
pub const KVM_SET_USER_MEMORY_REGION: u64 =
    iow(KVMIO, 0x46, size_of::<kvm_userspace_memory_region>());
pub const KVM_SET_CLOCK: u64 = iow(KVMIO, 0x7b, size_of::<kvm_clock_data>());
pub const KVM_GET_CLOCK: u64 = ior(KVMIO, 0x7c, size_of::<kvm_clock_data>());
// vCPU
pub const KVM_RUN: u64 = io(KVMIO, 0x80);
pub const KVM_GET_REGS: u64 = ior(KVMIO, 0x81, size_of::<kvm_regs>());
pub const KVM_SET_REGS: u64 = iow(KVMIO, 0x82, size_of::<kvm_regs>());
pub const KVM_GET_SREGS: u64 = ior(KVMIO, 0x83, size_of::<kvm_sregs>());
pub const KVM_SET_SREGS: u64 = iow(KVMIO, 0x84, size_of::<kvm_sregs>());
pub const KVM_GET_MSRS: u64 = iowr(KVMIO, 0x88, size_of::<kvm_msrs>());
pub const KVM_SET_MSRS: u64 = iow(KVMIO, 0x89, size_of::<kvm_msrs>());
pub const KVM_SET_CPUID2: u64 = iow(KVMIO, 0x90, size_of::<kvm_cpuid2>());
pub const KVM_GET_VCPU_EVENTS: u64 = ior(KVMIO, 0x9f, size_of::<kvm_vcpu_events>());
pub const KVM_SET_VCPU_EVENTS: u64 = iow(KVMIO, 0xa0, size_of::<kvm_vcpu_events>());
pub const KVM_GET_DEBUGREGS: u64 = ior(KVMIO, 0xa1, size_of::<kvm_debugregs>());
pub const KVM_SET_DEBUGREGS: u64 = iow(KVMIO, 0xa2, size_of::<kvm_debugregs>());
pub const KVM_GET_TSC_KHZ: u64 = io(KVMIO, 0xa3);
pub const KVM_GET_XSAVE: u64 = ior(KVMIO, 0xa4, size_of::<kvm_xsave>());
pub const KVM_SET_XSAVE: u64 = iow(KVMIO, 0xa5, size_of::<kvm_xsave>());
pub const KVM_GET_XCRS: u64 = ior(KVMIO, 0xa6, size_of::<kvm_xcrs>());
pub const KVM_SET_XCRS: u64 = iow(KVMIO, 0xa7, size_of::<kvm_xcrs>());
pub const KVM_GET_XSAVE2: u64 = ior(KVMIO, 0xcf, size_of::<kvm_xsave>());

// userfaultfd
pub const USERFAULTFD_IOC_NEW: u64 = io(UFFDIO, 0x00);
pub const UFFDIO_REGISTER: u64 = iowr(UFFDIO, 0x00, 32);
pub const UFFDIO_UNREGISTER: u64 = ior(UFFDIO, 0x01, 16);
pub const UFFDIO_WAKE: u64 = ior(UFFDIO, 0x02, 16);
pub const UFFDIO_COPY: u64 = iowr(UFFDIO, 0x03, 40);
pub const UFFDIO_ZEROPAGE: u64 = iowr(UFFDIO, 0x04, 32);
pub const UFFDIO_API: u64 = iowr(UFFDIO, 0x3f, 24);

// terminals and sockets
pub const TCGETS: u64 = 0x5401;
pub const FIONBIO: u64 = 0x5421;
pub const FIOCLEX: u64 = 0x5451;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_match_the_kernel_headers() {
        // Values from <linux/kvm.h> and <linux/userfaultfd.h> on x86_64 (also seen in
        // strace of a restore and a served request).
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_CREATE_VM, 0xae01);
        assert_eq!(KVM_SET_USER_MEMORY_REGION, 0x4020ae46);
        assert_eq!(KVM_SET_MSRS, 0x4008ae89);
        assert_eq!(KVM_GET_MSRS, 0xc008ae88);
        assert_eq!(KVM_SET_CPUID2, 0x4008ae90);
        assert_eq!(KVM_GET_SUPPORTED_CPUID, 0xc008ae05);
        assert_eq!(KVM_SET_XSAVE, 0x5000aea5);
        assert_eq!(KVM_SET_XCRS, 0x4188aea7);
        assert_eq!(KVM_SET_SREGS, 0x4138ae84);
        assert_eq!(KVM_SET_REGS, 0x4090ae82);
        assert_eq!(KVM_SET_DEBUGREGS, 0x4080aea2);
        assert_eq!(KVM_SET_VCPU_EVENTS, 0x4040aea0);
        assert_eq!(KVM_SET_CLOCK, 0x4030ae7b);
        assert_eq!(UFFDIO_COPY, 0xc028aa03);
        assert_eq!(UFFDIO_REGISTER, 0xc020aa00);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020aa04);
        assert_eq!(UFFDIO_API, 0xc018aa3f);
    }
}
