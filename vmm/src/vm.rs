//! One KVM virtual machine with one vCPU and its guest RAM, and the loop that runs the
//! vCPU and decodes the guest's hostcalls. Everything the guest writes is hostile input:
//! requests are decoded with `vmm_abi::decode_request`, which range-checks every
//! address and length, and any malformed request stops the guest with an error.

use crate::cpu::GuestCpu;
use crate::loader::{self, LoadError};
use crate::memory::{GuestMemory, MemoryError};
use crate::platform::{Backend, PlatformError};
use crate::watchdog::Watchdog;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::time::Duration;
use vmm_abi::{layout, offsets, AbiError, GuestRange, Mailbox, Request, MAILBOX_BYTES};

/// A guest that cannot be set up as asked.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("guest RAM of {0} MiB: must be an even number of MiB between {min} and {max}", min = layout::MIN_MEM_MIB, max = layout::MAX_MEM_MIB)]
    BadMemSize(u64),
    #[error("the module ({module} bytes) does not fit in {mem_mib} MiB of guest RAM")]
    ModuleTooLarge { module: usize, mem_mib: u64 },
    #[error(transparent)]
    Compile(#[from] crate::aot::AotError),
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "open /dev/kvm: {0} (is KVM available and are you allowed to use it? try `ls -l /dev/kvm`)"
    )]
    OpenKvm(kvm_ioctls::Error),
    #[error("create the VM (KVM_CREATE_VM): {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("register guest RAM with KVM (KVM_SET_USER_MEMORY_REGION): {0}")]
    MemoryRegion(kvm_ioctls::Error),
    #[error("create the vCPU (KVM_CREATE_VCPU): {0}")]
    CreateVcpu(kvm_ioctls::Error),
    #[error("set up the vCPU registers ({step}): {source}")]
    Registers {
        step: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Platform(#[from] PlatformError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("run the vCPU (KVM_RUN): {0}")]
    Run(kvm_ioctls::Error),
    #[error(transparent)]
    Setup(SetupError),
}

/// Why a guest stopped without producing a response.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("the guest did not finish within the {0:?} timeout and was stopped")]
    Timeout(Duration),
    #[error("the invocation was interrupted (its caller went away) and the guest was stopped")]
    Interrupted,
    #[error("guest CPU exception: {name} (vector {vector}) error code {error_code:#x} at rip {rip:#x}, cr2 {cr2:#x}, rsp {rsp:#x}")]
    Fault {
        vector: u64,
        name: &'static str,
        error_code: u64,
        rip: u64,
        cr2: u64,
        rsp: u64,
    },
    #[error("guest ran out of memory: {0}")]
    OutOfMemory(String),
    #[error("guest kernel panicked: {0}")]
    Panic(String),
    #[error("{0}")]
    Runtime(String),
    /// The guest's engine refused the module (or the artifact compiled from it) before
    /// running any of it.
    #[error("{0}")]
    ModuleInvalid(String),
    #[error("the guest sent a malformed hostcall and was stopped: {0}")]
    BadHostcall(AbiError),
    #[error("the guest wrote more than {0} bytes of output and was stopped")]
    OutputLimit(usize),
    #[error("the guest shut down unexpectedly (triple fault)")]
    Shutdown,
    #[error("unexpected VM exit: {0}")]
    UnexpectedExit(String),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Guest(#[from] GuestError),
}

impl From<MemoryError> for RunError {
    fn from(e: MemoryError) -> Self {
        RunError::Vm(VmError::Memory(e))
    }
}

/// A hostcall that the caller must answer (output writes are handled inside the loop).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hostcall {
    GetFunction { buf: GuestRange },
    ReadStdin { buf: GuestRange },
    Exit { code: i32 },
}

/// Which of the guest's outputs lost bytes at an output cap: the guest's own (reported in
/// its exit hostcall) or the VMM's (a guest that writes past it is stopped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Truncated {
    pub stdout: bool,
    pub stderr: bool,
}

impl Truncated {
    pub fn any(self) -> bool {
        self.stdout || self.stderr
    }
    fn set(&mut self, fd: u32) {
        if fd == 1 {
            self.stdout = true;
        } else {
            self.stderr = true;
        }
    }
}

/// What the guest has written to stdout/stderr so far, with a cap on the total.
#[derive(Debug, Default)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub limit: usize,
    pub truncated: Truncated,
}

impl Output {
    pub fn new(limit: usize) -> Self {
        Output {
            limit,
            ..Default::default()
        }
    }
    fn append(&mut self, fd: u32, mem: &GuestMemory, r: GuestRange) -> Result<(), RunError> {
        if self.stdout.len() + self.stderr.len() + r.len as usize > self.limit {
            self.truncated.set(fd);
            return Err(GuestError::OutputLimit(self.limit).into());
        }
        let out = if fd == 1 {
            &mut self.stdout
        } else {
            &mut self.stderr
        };
        mem.append_to(r.gpa, r.len, out)?;
        Ok(())
    }
}

/// This process's /dev/kvm: opened once, its back end detected with a probe vCPU, the
/// guest TSC frequency read and the guest CPU model built once (every /dev/kvm of a process
/// is the same back end). See [`host`].
pub struct Host {
    pub kvm: std::sync::Arc<Kvm>,
    pub backend: Backend,
    pub tsc_khz: u64,
    pub cpu: &'static GuestCpu,
    /// The probe's VM and vCPU, never run: the first [`VmParts::create`] takes them instead
    /// of creating another (a one-shot `vmm run` or `vmm restore` makes one VM, not two).
    probe: std::sync::Mutex<Option<(VmFd, VcpuFd)>>,
}

/// This process's [`Host`]; until it has been opened, every call tries again.
pub fn host() -> Result<&'static Host, VmError> {
    static HOST: std::sync::OnceLock<Host> = std::sync::OnceLock::new();
    static OPENING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if let Some(h) = HOST.get() {
        return Ok(h);
    }
    // One opening at a time: a caller that comes while another thread opens waits for it
    // (a one-shot restore opens on a thread of its own while it loads the template).
    let _opening = OPENING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(h) = HOST.get() {
        return Ok(h);
    }
    let kvm = std::sync::Arc::new(Kvm::new().map_err(VmError::OpenKvm)?);
    let vm = kvm.create_vm().map_err(VmError::CreateVm)?;
    let vcpu = vm.create_vcpu(0).map_err(VmError::CreateVcpu)?;
    let backend = Backend::detect(&vcpu);
    let tsc_khz = backend.tsc_khz(&vcpu)?;
    let cpu = GuestCpu::for_host(&kvm, backend)?;
    Ok(HOST.get_or_init(|| Host {
        kvm,
        backend,
        tsc_khz,
        cpu,
        probe: std::sync::Mutex::new(Some((vm, vcpu))),
    }))
}

/// A VM and its vCPU before guest RAM is attached (see [`Vm::new_unregistered`]): lets a
/// restore create them while another thread fills the memory.
pub struct VmParts {
    pub kvm: std::sync::Arc<Kvm>,
    pub vm: VmFd,
    pub vcpu: VcpuFd,
    pub backend: Backend,
    pub tsc_khz: u64,
    /// The guest CPU model: its CPUID table is set on the vCPU before it runs.
    pub cpu: &'static GuestCpu,
}

impl VmParts {
    /// A VM and its vCPU on this process's /dev/kvm ([`host`]).
    pub fn create() -> Result<VmParts, VmError> {
        let h = host()?;
        let probe = h.probe.lock().ok().and_then(|mut p| p.take());
        let (vm, vcpu) = match probe {
            Some(p) => p,
            None => {
                let vm = h.kvm.create_vm().map_err(VmError::CreateVm)?;
                let vcpu = vm.create_vcpu(0).map_err(VmError::CreateVcpu)?;
                (vm, vcpu)
            }
        };
        Ok(VmParts {
            kvm: h.kvm.clone(),
            vm,
            vcpu,
            backend: h.backend,
            tsc_khz: h.tsc_khz,
            cpu: h.cpu,
        })
    }

    /// Prepare the fresh vCPU for a restore: the model's CPUID table, before the saved
    /// state (whose MSRs KVM checks against it) is written.
    pub fn prepare_restore(&self) -> Result<(), VmError> {
        Ok(self.cpu.set_on(&self.vcpu)?)
    }

    /// Attach guest RAM (not yet registered with KVM: see [`Vm::register_memory`]).
    pub fn with_memory(self, mem: GuestMemory) -> Vm {
        let VmParts {
            kvm,
            vm,
            vcpu,
            backend,
            tsc_khz,
            cpu,
        } = self;
        Vm {
            kvm,
            vm,
            vcpu,
            mem,
            backend,
            tsc_khz,
            cpu,
            exits: 0,
        }
    }
}

pub struct Vm {
    pub(crate) kvm: std::sync::Arc<Kvm>,
    pub(crate) vm: VmFd,
    pub(crate) vcpu: VcpuFd,
    /// Registered with KVM as slot 0 for as long as the VM exists: never replaced (private
    /// to this file, read through [`Vm::mem`]).
    mem: GuestMemory,
    pub(crate) backend: Backend,
    pub(crate) tsc_khz: u64,
    pub(crate) cpu: &'static GuestCpu,
    /// VM exits served so far.
    pub(crate) exits: u64,
}

impl Vm {
    /// Guest RAM.
    pub(crate) fn mem(&self) -> &GuestMemory {
        &self.mem
    }

    /// Create a VM over `mem` (slot 0 at GPA 0) with one vCPU.
    pub fn new(mem: GuestMemory) -> Result<Vm, VmError> {
        let vm = Self::new_unregistered(mem)?;
        vm.register_memory()?;
        Ok(vm)
    }

    /// Create the VM and its vCPU without telling KVM about guest RAM yet: memory can then
    /// be filled while the vCPU state is written, without KVM's MMU notifiers firing on
    /// every page the host touches (which makes filling registered memory ~10x slower).
    /// Call [`Vm::register_memory`] before running the vCPU.
    pub fn new_unregistered(mem: GuestMemory) -> Result<Vm, VmError> {
        Ok(VmParts::create()?.with_memory(mem))
    }

    /// Register guest RAM as memory slot 0 at GPA 0.
    pub fn register_memory(&self) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: self.mem.size(),
            userspace_addr: self.mem.host_addr() as u64,
        };
        // SAFETY: the region describes `self.mem`'s mapping, which this Vm owns and keeps
        // alive for as long as the VM fd exists (fields drop in declaration order: vcpu
        // and vm before mem).
        unsafe { self.vm.set_user_memory_region(region) }.map_err(VmError::MemoryRegion)
    }

    /// Make KVM forget every mapping of guest memory it built (its shadow page tables
    /// under PVM, the second-level tables on hardware): the memory slot is deleted and
    /// added again over the same host memory, which stays as it is. Needed after the host
    /// rewrote the guest's page-table pages (a reset): under shadow paging KVM does not see
    /// such writes, and entries the guest had mapped would stay reachable. The guest's
    /// next touches build the mappings again (one exit each, no host page faults).
    pub fn forget_mappings(&self) -> Result<(), VmError> {
        let mut region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 0,
            userspace_addr: self.mem.host_addr() as u64,
        };
        // SAFETY: deleting slot 0 (memory_size 0) removes KVM's use of the mapping; the
        // vCPU is not running (the caller holds `&self` between runs).
        unsafe { self.vm.set_user_memory_region(region) }.map_err(VmError::MemoryRegion)?;
        region.memory_size = self.mem.size();
        // SAFETY: as in `register_memory`: the region is `self.mem`'s mapping, which
        // outlives the VM fd.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(VmError::MemoryRegion)
    }

    /// Load the kernel, build page tables and the mailbox, and set the start state.
    pub fn setup_boot(&mut self, kernel_elf: &[u8], mailbox: &Mailbox) -> Result<(), VmError> {
        let entry = loader::load_kernel(&self.mem, kernel_elf)?;
        loader::build_page_tables(&self.mem)?;
        self.mem.write(layout::MAILBOX_GPA, &mailbox.to_bytes())?;
        let sregs = self.vcpu.get_sregs().map_err(|e| VmError::Registers {
            step: "KVM_GET_SREGS",
            source: e,
        })?;
        self.vcpu
            .set_sregs(&loader::long_mode_sregs(sregs))
            .map_err(|e| VmError::Registers {
                step: "KVM_SET_SREGS",
                source: e,
            })?;
        self.vcpu
            .set_regs(&loader::entry_regs(entry))
            .map_err(|e| VmError::Registers {
                step: "KVM_SET_REGS",
                source: e,
            })?;
        self.cpu.set_on(&self.vcpu)?;
        self.backend.setup_vcpu(&self.vcpu)?;
        Ok(())
    }

    pub fn read_mailbox(&self) -> Result<Mailbox, MemoryError> {
        let mut b = [0u8; MAILBOX_BYTES];
        self.mem.read_into(layout::MAILBOX_GPA, &mut b)?;
        Ok(Mailbox::from_bytes(&b))
    }

    /// Run the vCPU until the guest makes a hostcall the caller has to answer.
    pub fn next_hostcall(
        &mut self,
        out: &mut Output,
        watchdog: &Watchdog,
        timeout: Duration,
    ) -> Result<Hostcall, RunError> {
        let mut spurious_halts = 0u32;
        loop {
            let exit = self.vcpu.run();
            self.exits += 1;
            match exit {
                Ok(VcpuExit::IoOut(port, _)) if port == vmm_abi::HOSTCALL_PORT => {}
                Ok(VcpuExit::Hlt) => {
                    // After a host-side write of the PVM VIF MSR the first hlt returns at
                    // once; the guest only halts for good after its final hostcall.
                    spurious_halts += 1;
                    if spurious_halts > 16 {
                        return Err(GuestError::UnexpectedExit(
                            "the guest halted without finishing".into(),
                        )
                        .into());
                    }
                    continue;
                }
                Ok(VcpuExit::Shutdown) => return Err(GuestError::Shutdown.into()),
                Ok(VcpuExit::IoOut(port, _)) | Ok(VcpuExit::IoIn(port, _)) => {
                    return Err(GuestError::UnexpectedExit(format!(
                        "port I/O to unknown port {port:#x}"
                    ))
                    .into())
                }
                Ok(VcpuExit::MmioRead(addr, _)) | Ok(VcpuExit::MmioWrite(addr, _)) => {
                    return Err(GuestError::UnexpectedExit(format!(
                        "access to unbacked guest address {addr:#x}"
                    ))
                    .into())
                }
                Ok(other) => return Err(GuestError::UnexpectedExit(format!("{other:?}")).into()),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    if watchdog.fired() {
                        if watchdog.interrupted() {
                            return Err(GuestError::Interrupted.into());
                        }
                        return Err(GuestError::Timeout(timeout).into());
                    }
                    continue;
                }
                Err(e) => return Err(VmError::Run(e).into()),
            }
            let mb = self.read_mailbox()?;
            let req =
                vmm_abi::decode_request(&mb, self.mem.size()).map_err(GuestError::BadHostcall)?;
            match req {
                Request::GetFunction { buf } => return Ok(Hostcall::GetFunction { buf }),
                Request::ReadStdin { buf } => return Ok(Hostcall::ReadStdin { buf }),
                Request::Write { fd, data } => {
                    out.append(fd, &self.mem, data)?;
                    self.complete(0, 0, false)?;
                }
                Request::Exit {
                    code,
                    stdout,
                    stderr,
                    flags,
                } => {
                    out.append(1, &self.mem, stdout)?;
                    out.append(2, &self.mem, stderr)?;
                    if flags & vmm_abi::EXIT_STDOUT_TRUNCATED != 0 {
                        out.truncated.set(1);
                    }
                    if flags & vmm_abi::EXIT_STDERR_TRUNCATED != 0 {
                        out.truncated.set(2);
                    }
                    return Ok(Hostcall::Exit { code });
                }
                Request::Fault {
                    vector,
                    error_code,
                    rip,
                    cr2,
                    rsp,
                } => {
                    let name = vmm_abi::exception_name(vector);
                    return Err(GuestError::Fault {
                        vector,
                        name,
                        error_code,
                        rip,
                        cr2,
                        rsp,
                    }
                    .into());
                }
                Request::Panic { message, kind } => {
                    let msg =
                        String::from_utf8_lossy(&self.mem.read_vec(message.gpa, message.len)?)
                            .into_owned();
                    return Err(if kind == vmm_abi::PANIC_OUT_OF_MEMORY {
                        GuestError::OutOfMemory(msg)
                    } else {
                        GuestError::Panic(msg)
                    }
                    .into());
                }
                Request::Error { code, message } => {
                    let msg =
                        String::from_utf8_lossy(&self.mem.read_vec(message.gpa, message.len)?)
                            .into_owned();
                    return Err(if code == vmm_abi::ERR_MODULE_INVALID {
                        GuestError::ModuleInvalid(msg)
                    } else {
                        GuestError::Runtime(msg)
                    }
                    .into());
                }
            }
        }
    }

    /// Complete the I/O of the exit the vCPU is stopped at (KVM finishes an `out` only at
    /// the next KVM_RUN), so that its registers can be saved: one KVM_RUN with
    /// `immediate_exit` set, which returns EINTR without running guest code.
    pub fn settle(&mut self) -> Result<(), VmError> {
        self.vcpu.set_kvm_immediate_exit(1);
        let r = self.vcpu.run().map(|_| ());
        self.vcpu.set_kvm_immediate_exit(0);
        match r {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Ok(()) => Ok(()),
            Err(e) => Err(VmError::Run(e)),
        }
    }

    /// Answer the pending hostcall: result words, the current wall clock and, if asked,
    /// fresh entropy for the guest's CSPRNG.
    pub fn complete(
        &mut self,
        ret: u64,
        ret2: u64,
        fresh_entropy: bool,
    ) -> Result<(), MemoryError> {
        let base = layout::MAILBOX_GPA;
        self.mem.write_u64(base + offsets::RET as u64, ret)?;
        self.mem.write_u64(base + offsets::RET2 as u64, ret2)?;
        if fresh_entropy {
            let mut seed = [0u8; 32];
            fill_random(&mut seed);
            self.mem.write(base + offsets::ENTROPY as u64, &seed)?;
            let mut word = [0u8; 8];
            self.mem
                .read_into(base + offsets::ENTROPY_GEN as u64, &mut word)?;
            let gen = u64::from_le_bytes(word).wrapping_add(1);
            self.mem
                .write_u64(base + offsets::ENTROPY_GEN as u64, gen)?;
        }
        self.mem
            .write_u64(base + offsets::NOW_UNIX_NS as u64, unix_now_ns())?;
        Ok(())
    }
}

pub fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Host entropy from the kernel's CSPRNG (getrandom(2)).
pub fn fill_random(buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes at most buf.len()-done bytes into the tail of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n > 0 {
            done += n as usize;
        } else if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            panic!("getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
}
