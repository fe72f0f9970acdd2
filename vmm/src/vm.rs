//! One KVM virtual machine with one vCPU and its guest RAM, and the loop that runs the
//! vCPU and decodes the guest's hostcalls. Everything the guest writes is hostile input:
//! requests are decoded with `vmm_abi::decode_request`, which range-checks every
//! address and length, and any malformed request stops the guest with an error.

use crate::cpu::GuestCpu;
use crate::hostcall::{self, Answers, Context, Next, SlotTable};
use crate::loader::{self, LoadError};
use crate::memory::{GuestMemory, MemoryError};
use crate::platform::{Backend, PlatformError};
use crate::watchdog::Watchdog;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::time::Duration;
use vmm_abi::{layout, AbiError, GuestRange, Mailbox, MAILBOX_BYTES};

/// Which 2 MiB regions of guest RAM have KVM memory slots ("granted": see `vmm_abi`'s
/// docs), and the slots that cover them. KVM allocates per-slot metadata by the slot's
/// size (~10 bytes per 4 KiB page here), so an instance's slots cover only what its guest
/// was granted. Slots are windows into the one host mapping of guest RAM; a grant adds
/// slots over the regions it newly covers (KVM cannot resize a slot), and
/// [`Vm::forget_mappings`] re-registers the granted regions as the fewest slots.
#[derive(Clone, Debug)]
pub struct Grants {
    regions: Vec<bool>,
    /// (gpa, len) of slot `i`.
    slots: Vec<(u64, u64)>,
    mem_size: u64,
}

/// Most memory slots an instance holds: a guest whose grants would fragment its RAM
/// beyond this is granted the gaps between them too, and gets one slot over them all
/// (KVM allows ~32k slots, but each costs an SRCU synchronize to add or delete).
pub const MAX_SLOTS: usize = 64;

impl Grants {
    const REGION: u64 = layout::GRANT_REGION;

    /// Nothing granted in `mem_size` bytes of guest RAM.
    pub fn none(mem_size: u64) -> Grants {
        Grants {
            regions: vec![false; mem_size.div_ceil(Self::REGION) as usize],
            slots: Vec::new(),
            mem_size,
        }
    }

    /// The regions the guest may never lack: the first (page tables, mailbox, grant map)
    /// and the stack's. The kernel image's are granted at boot (see [`Vm::setup_boot`]);
    /// the guard below the stack never is (the guest does not map it).
    pub fn fixed(mem_size: u64) -> Grants {
        let mut g = Grants::none(mem_size);
        g.mark(0, Self::REGION);
        g.mark(
            layout::STACK_BOTTOM,
            layout::HEAP_START - layout::STACK_BOTTOM,
        );
        g
    }

    /// Mark the regions that `[gpa, gpa + len)` touches (clamped to guest RAM) granted;
    /// returns the runs of regions that were not yet (as (gpa, len)).
    pub(crate) fn mark(&mut self, gpa: u64, len: u64) -> Vec<(u64, u64)> {
        let end = gpa.saturating_add(len).min(self.mem_size);
        let (first, last) = (gpa / Self::REGION, end.div_ceil(Self::REGION));
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for r in first..last {
            let Some(g) = self.regions.get_mut(r as usize) else {
                break;
            };
            if *g {
                continue;
            }
            *g = true;
            let at = r * Self::REGION;
            let n = Self::REGION.min(self.mem_size - at);
            match runs.last_mut() {
                Some((a, l)) if *a + *l == at => *l += n,
                _ => runs.push((at, n)),
            }
        }
        runs
    }

    /// Grant every region between the lowest and the highest granted one.
    fn fill_gaps(&mut self) {
        let first = self.regions.iter().position(|&g| g);
        let last = self.regions.iter().rposition(|&g| g);
        if let (Some(a), Some(b)) = (first, last) {
            self.regions[a..=b].iter_mut().for_each(|g| *g = true);
        }
    }

    /// The granted regions as the fewest runs (gpa, len).
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (r, _) in self.regions.iter().enumerate().filter(|(_, &g)| g) {
            let at = r as u64 * Self::REGION;
            let n = Self::REGION.min(self.mem_size - at);
            match runs.last_mut() {
                Some((a, l)) if *a + *l == at => *l += n,
                _ => runs.push((at, n)),
            }
        }
        runs
    }

    /// Add the regions a grant map (as the guest holds it: bit `r % 64` of little-endian
    /// word `r / 64`) names. Hostile input: a bit past guest RAM is refused.
    pub fn add_map(&mut self, map: &[u8]) -> Result<(), String> {
        for (byte, &b) in map.iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) == 0 {
                    continue;
                }
                let r = byte * 8 + bit;
                if r >= self.regions.len() {
                    return Err(format!(
                        "the grant map names region {r} (at {:#x}), past guest RAM of {:#x} bytes",
                        r as u64 * Self::REGION,
                        self.mem_size
                    ));
                }
                self.regions[r] = true;
            }
        }
        Ok(())
    }

    /// The grant map of these regions ([`layout::GRANT_MAP_BYTES`]).
    pub fn map(&self) -> [u8; layout::GRANT_MAP_BYTES] {
        let mut m = [0u8; layout::GRANT_MAP_BYTES];
        for (r, _) in self.regions.iter().enumerate().filter(|(_, &g)| g) {
            if let Some(b) = m.get_mut(r / 8) {
                *b |= 1 << (r % 8);
            }
        }
        m
    }

    /// Bytes of guest RAM granted.
    pub fn bytes(&self) -> u64 {
        self.runs().iter().map(|&(_, l)| l).sum()
    }

    /// Memory slots registered.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Whether every region is granted.
    pub fn all(&self) -> bool {
        self.regions.iter().all(|&g| g)
    }

    /// The registered memory slots, (gpa, len) of slot `i` at `i`.
    pub fn slot_ranges(&self) -> &[(u64, u64)] {
        &self.slots
    }

    /// Register `[gpa, gpa + len)` of guest RAM as the next memory slot.
    fn add_slot(&mut self, slots: &mut impl SlotTable, gpa: u64, len: u64) -> Result<(), VmError> {
        if gpa.checked_add(len).is_none_or(|e| e > self.mem_size) {
            return Err(VmError::Memory(MemoryError::OutOfRange {
                gpa,
                len,
                size: self.mem_size,
            }));
        }
        slots.add(self.slots.len() as u32, gpa, len)?;
        self.slots.push((gpa, len));
        Ok(())
    }

    /// Register the granted regions as memory slots (one per run of regions), forgetting
    /// the slots this list held (not deleted: see [`Grants::rebuild_slots`]), and write the
    /// grant map into guest memory.
    pub fn register_slots(
        &mut self,
        slots: &mut impl SlotTable,
        mem: &GuestMemory,
    ) -> Result<(), VmError> {
        self.slots.clear();
        if self.runs().len() > MAX_SLOTS {
            // Fragmented (a template's map is what its guest left in its grant map page):
            // one slot from the lowest granted region to the highest, as for a grant.
            self.fill_gaps();
        }
        for (gpa, len) in self.runs() {
            self.add_slot(slots, gpa, len)?;
        }
        self.write_map(mem)?;
        Ok(())
    }

    /// Delete every memory slot, then register the granted regions again as the fewest
    /// slots (see [`Vm::forget_mappings`]).
    pub fn rebuild_slots(
        &mut self,
        slots: &mut impl SlotTable,
        mem: &GuestMemory,
    ) -> Result<(), VmError> {
        for (id, &(gpa, len)) in self.slots.iter().enumerate() {
            slots.delete(id as u32, gpa, len)?;
        }
        self.register_slots(slots, mem)
    }

    /// Serve the guest's grant request: slots over the regions of `[gpa, gpa + len)` not
    /// granted yet (range-checked by the decoder), and the grant map updated.
    pub fn grant(
        &mut self,
        slots: &mut impl SlotTable,
        mem: &GuestMemory,
        gpa: u64,
        len: u64,
    ) -> Result<(), VmError> {
        let runs = self.mark(gpa, len);
        tracing::debug!(gpa, len, new = ?runs, slots = self.slots.len(), "memory grant");
        if runs.is_empty() {
            // Nothing new, but the map is made right again (a guest that overwrote its own
            // map, e.g. with a read of stdin over it, would ask again and again).
            self.write_map(mem)?;
            return Ok(());
        }
        if self.slots.len() + runs.len() > MAX_SLOTS {
            // Fragmented: one slot over everything from the lowest granted region to the
            // highest (a guest's own RAM: granting more is safe, only costlier).
            self.fill_gaps();
            self.rebuild_slots(slots, mem)?;
        } else {
            for (a, l) in runs {
                self.add_slot(slots, a, l)?;
            }
        }
        self.write_map(mem)?;
        Ok(())
    }

    /// Write the grant map into guest memory if it differs from what is there (a page of
    /// a template mapped copy-on-write stays shared when it is already right).
    pub fn write_map(&self, mem: &GuestMemory) -> Result<(), MemoryError> {
        let map = self.map();
        let mut now = [0u8; layout::GRANT_MAP_BYTES];
        mem.read_into(layout::GRANT_MAP_GPA, &mut now)?;
        if now != map {
            mem.write(layout::GRANT_MAP_GPA, &map)?;
        }
        Ok(())
    }
}

/// The memory slots of a [`Vm`]: registered with KVM over its guest RAM's host mapping.
struct KvmSlots<'a> {
    vm: &'a VmFd,
    mem: &'a GuestMemory,
}

impl SlotTable for KvmSlots<'_> {
    fn add(&mut self, id: u32, gpa: u64, len: u64) -> Result<(), VmError> {
        if gpa.checked_add(len).is_none_or(|e| e > self.mem.size()) {
            return Err(VmError::Memory(MemoryError::OutOfRange {
                gpa,
                len,
                size: self.mem.size(),
            }));
        }
        let region = kvm_userspace_memory_region {
            slot: id,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: self.mem.host_addr() as u64 + gpa,
        };
        // SAFETY: the region lies inside `self.mem`'s mapping (checked above), which the
        // Vm owns and keeps alive for as long as the VM fd exists (fields drop in
        // declaration order: vcpu and vm before mem); slot ids are never reused while in
        // use (a new slot takes the next id; [`Grants`] deletes them all before reuse).
        unsafe { self.vm.set_user_memory_region(region) }.map_err(VmError::MemoryRegion)
    }

    fn delete(&mut self, id: u32, gpa: u64, _len: u64) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot: id,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: 0,
            userspace_addr: self.mem.host_addr() as u64 + gpa,
        };
        // SAFETY: deleting a slot (memory_size 0) removes KVM's use of the mapping; the
        // vCPU is not running (the Vm is borrowed mutably between runs).
        unsafe { self.vm.set_user_memory_region(region) }.map_err(VmError::MemoryRegion)
    }
}

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
    pub(crate) fn append(
        &mut self,
        fd: u32,
        mem: &GuestMemory,
        r: GuestRange,
    ) -> Result<(), RunError> {
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
        let grants = Grants::fixed(mem.size());
        Vm {
            kvm,
            vm,
            vcpu,
            grants,
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
    /// Which regions of `mem` have memory slots (see [`Grants`]).
    grants: Grants,
    /// Memory slots over it are registered with KVM for as long as the VM exists: never
    /// replaced (private to this file, read through [`Vm::mem`]).
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

    /// Create a VM over `mem` with one vCPU and all of it granted (memory slots over all
    /// of guest RAM).
    pub fn new(mem: GuestMemory) -> Result<Vm, VmError> {
        let mut vm = Self::new_unregistered(mem)?;
        let size = vm.mem.size();
        vm.grants.mark(0, size);
        vm.register_memory()?;
        Ok(vm)
    }

    /// Create the VM and its vCPU without telling KVM about guest RAM yet: memory can then
    /// be filled while the vCPU state is written, without KVM's MMU notifiers firing on
    /// every page the host touches (which makes filling registered memory ~10x slower).
    /// Only the fixed regions are granted: see [`Vm::grant_initial`]. Call
    /// [`Vm::register_memory`] before running the vCPU.
    pub fn new_unregistered(mem: GuestMemory) -> Result<Vm, VmError> {
        Ok(VmParts::create()?.with_memory(mem))
    }

    /// Before [`Vm::register_memory`]: grant the regions `[gpa, gpa + len)` touches as
    /// well (clamped to guest RAM).
    pub fn grant_initial(&mut self, gpa: u64, len: u64) {
        self.grants.mark(gpa, len);
    }

    /// Before [`Vm::register_memory`]: grant the regions a grant map read from a snapshot
    /// names as well (hostile input: refused if it names regions past guest RAM).
    pub fn grant_initial_map(&mut self, map: &[u8]) -> Result<(), String> {
        self.grants.add_map(map)
    }

    /// What is granted.
    pub fn grants(&self) -> &Grants {
        &self.grants
    }

    /// Register the granted regions with KVM as memory slots (one per run of regions), and
    /// write the grant map into guest memory.
    pub fn register_memory(&mut self) -> Result<(), VmError> {
        let mut slots = KvmSlots {
            vm: &self.vm,
            mem: &self.mem,
        };
        self.grants.register_slots(&mut slots, &self.mem)
    }

    /// Write the grant map into guest memory if it differs from what is there (a page of
    /// a template mapped copy-on-write stays shared when it is already right).
    pub fn write_grant_map(&self) -> Result<(), MemoryError> {
        self.grants.write_map(&self.mem)
    }

    /// Serve the guest's grant request: slots over the regions of `[gpa, gpa + len)` not
    /// granted yet (range-checked by the decoder), and the grant map updated.
    fn grant(&mut self, gpa: u64, len: u64) -> Result<(), VmError> {
        let mut slots = KvmSlots {
            vm: &self.vm,
            mem: &self.mem,
        };
        self.grants.grant(&mut slots, &self.mem, gpa, len)
    }

    /// Make KVM forget every mapping of guest memory it built (its shadow page tables
    /// under PVM, the second-level tables on hardware): every memory slot is deleted and
    /// the granted regions added again (as the fewest slots) over the same host memory,
    /// which stays as it is. Needed after the host rewrote the guest's page-table pages (a
    /// reset): under shadow paging KVM does not see such writes, and entries the guest
    /// had mapped would stay reachable. The guest's next touches build the mappings again
    /// (one exit each, no host page faults).
    pub fn forget_mappings(&mut self) -> Result<(), VmError> {
        let mut slots = KvmSlots {
            vm: &self.vm,
            mem: &self.mem,
        };
        self.grants.rebuild_slots(&mut slots, &self.mem)
    }

    /// Load the kernel, build page tables and the mailbox, register guest memory (the
    /// granted regions and the kernel image's), and set the start state.
    pub fn setup_boot(&mut self, kernel_elf: &[u8], mailbox: &Mailbox) -> Result<(), VmError> {
        let image = loader::load_kernel(&self.mem, kernel_elf)?;
        let (entry, image_end) = (image.entry, image.end);
        // The kernel image's regions (.bss included) are granted with the fixed ones.
        if self.grants.slots.is_empty() {
            self.grant_initial(layout::KERNEL_BASE, image_end - layout::KERNEL_BASE);
            self.register_memory()?;
        } else {
            self.grant(layout::KERNEL_BASE, image_end - layout::KERNEL_BASE)?;
        }
        loader::build_page_tables(&self.mem, &image.segments)?;
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

    /// Run the vCPU until the guest makes a hostcall the caller has to answer: every
    /// hostcall is served by [`hostcall::handle_exit`], which answers from `answers` what
    /// it can.
    pub fn next_hostcall(
        &mut self,
        out: &mut Output,
        answers: &mut Answers<'_>,
        watchdog: &Watchdog,
        timeout: Duration,
    ) -> Result<Hostcall, RunError> {
        let mut spurious_halts = 0u32;
        loop {
            let exit = self.vcpu.run();
            self.exits += 1;
            match exit {
                Ok(VcpuExit::IoOut(port, value)) => {
                    let mut slots = KvmSlots {
                        vm: &self.vm,
                        mem: &self.mem,
                    };
                    let mut cx = Context {
                        mem: &self.mem,
                        grants: &mut self.grants,
                        slots: &mut slots,
                        out: &mut *out,
                        answers: &mut *answers,
                    };
                    match hostcall::handle_exit(port, value, &mut cx)? {
                        Next::Resume => continue,
                        Next::Stop(call) => return Ok(call),
                    }
                }
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
                Ok(VcpuExit::IoIn(port, _)) => {
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
        }
    }

    /// Answer `call`, a hostcall the guest waits in, from `answers` if it can be (see
    /// [`hostcall::answer`]).
    pub fn answer(
        &mut self,
        call: Hostcall,
        out: &mut Output,
        answers: &mut Answers<'_>,
    ) -> Result<Next, RunError> {
        let mut slots = KvmSlots {
            vm: &self.vm,
            mem: &self.mem,
        };
        let mut cx = Context {
            mem: &self.mem,
            grants: &mut self.grants,
            slots: &mut slots,
            out,
            answers,
        };
        hostcall::answer(call, &mut cx)
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
        hostcall::complete(&self.mem, ret, ret2, fresh_entropy)
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn grants_mark_new_runs_and_merge_into_the_fewest() {
        let mut g = Grants::fixed(64 * MIB);
        // The first region and the stack's (14..22 MiB).
        assert_eq!(g.runs(), vec![(0, 2 * MIB), (14 * MIB, 8 * MIB)]);
        assert_eq!(g.bytes(), 10 * MIB);
        // Only what is new comes back, as runs; a range that is not region-aligned
        // grants every region it touches.
        assert_eq!(g.mark(20 * MIB, 6 * MIB), vec![(22 * MIB, 4 * MIB)]);
        assert_eq!(g.mark(MIB, 3 * MIB), vec![(2 * MIB, 2 * MIB)]);
        assert!(g.mark(0, 26 * MIB).len() == 1, "4..14 MiB");
        assert_eq!(g.runs(), vec![(0, 26 * MIB)]);
        // Clamped to guest RAM.
        assert_eq!(g.mark(62 * MIB, u64::MAX), vec![(62 * MIB, 2 * MIB)]);
        assert_eq!(g.mark(u64::MAX - 5, 10), vec![]);
        assert_eq!(g.bytes(), 28 * MIB);
        g.fill_gaps();
        assert_eq!(g.runs(), vec![(0, 64 * MIB)]);
        let mut none = Grants::none(64 * MIB);
        none.fill_gaps();
        assert_eq!(none.bytes(), 0);
    }

    #[test]
    fn grant_maps_round_trip_and_hostile_ones_are_refused() {
        let mut g = Grants::fixed(512 * MIB);
        g.mark(100 * MIB, 10 * MIB);
        g.mark(510 * MIB, 2 * MIB);
        let map = g.map();
        assert_eq!(map.len(), layout::GRANT_MAP_BYTES);
        let mut back = Grants::none(512 * MIB);
        back.add_map(&map).unwrap();
        assert_eq!(back.runs(), g.runs());
        // A bit past guest RAM (region 256 of 512 MiB) is refused; a short map is fine.
        let mut bad = map;
        bad[32] = 1;
        let err = Grants::none(512 * MIB).add_map(&bad).unwrap_err();
        assert!(err.contains("past guest RAM"), "{err}");
        Grants::none(512 * MIB).add_map(&map[..3]).unwrap();
        // Every bit of the largest RAM is a region of it.
        let full = [0xffu8; layout::GRANT_MAP_BYTES];
        let mut all = Grants::none(layout::MAX_MEM_MIB * MIB);
        all.add_map(&full).unwrap();
        assert!(all.all());
        assert_eq!(all.runs(), vec![(0, layout::MAX_MEM_MIB * MIB)]);
    }
}
