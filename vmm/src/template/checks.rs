//! What a template must be before the VMM restores it or layers a function on it, checked
//! from its manifest alone (no KVM needed). `vmm restore` and `vmm template create` run
//! these checks before anything runs in a VM, and `vmm-store verify` runs the same code
//! ([`check_store`]), so verify reports exactly what restore would refuse.
//!
//! * **Provenance**: a runtime base records what it was made from ([`Provenance`]: module
//!   hash, runtime, engine, guest memory size, guest kernel and ABI); a function layer is
//!   refused when its options disagree with its base's, naming each option that differs.
//!   A function template records the base it was made on ([`BaseRef`](super::device::BaseRef)).
//! * **vCPU state**: decoded under a size limit and range-checked
//!   ([`VcpuState::validate`]).
//! * **Device state**: a known pending hostcall whose buffer lies inside guest memory.
//! * **Layering**: a runtime base has no parent; a function template is layered on the very
//!   runtime base it was made on (its pages are a diff against that base's).
//!
//! Templates from before provenance was recorded (device state version 1) still restore
//! (there is nothing to compare a restore against), but no new function is layered on such
//! a base: what it runs cannot be checked ([`CheckError::UnrecordedBase`]).

use super::device::{DeviceState, DeviceStateError, Provenance, DEVICE_STATE_VERSION, ENGINES};
use crate::persist::{PersistError, VcpuState};
use crate::text::shown;
use snapshot_store::{Store, Template, TemplateName};
use std::fmt;
use vmm_abi::{GuestRange, Op};

impl Provenance {
    /// Every way `self` (what a new layer asks for) differs from `base`'s provenance.
    pub fn differences(&self, base: &Provenance) -> Vec<Difference> {
        let mut d = Vec::new();
        if self.module_hash != base.module_hash {
            d.push(Difference::Module {
                ours: shown(&self.module_name),
                ours_hash: self.module_hash,
                base: shown(&base.module_name),
                base_hash: base.module_hash,
            });
        }
        if self.runtime != base.runtime {
            d.push(Difference::Runtime {
                ours: shown(&self.runtime),
                base: shown(&base.runtime),
            });
        }
        if self.engine != base.engine {
            d.push(Difference::Engine {
                ours: shown(&self.engine),
                base: shown(&base.engine),
            });
        }
        if self.mem_size != base.mem_size {
            d.push(Difference::MemSize {
                ours: self.mem_size,
                base: base.mem_size,
            });
        }
        if self.kernel_hash != base.kernel_hash {
            d.push(Difference::Kernel {
                ours: self.kernel_hash,
                base: base.kernel_hash,
            });
        }
        if self.abi_version != base.abi_version {
            d.push(Difference::Abi {
                ours: self.abi_version,
                base: base.abi_version,
            });
        }
        d
    }
}

/// One option in which a new function layer differs from its base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    Module {
        ours: String,
        ours_hash: u128,
        base: String,
        base_hash: u128,
    },
    Runtime {
        ours: String,
        base: String,
    },
    Engine {
        ours: String,
        base: String,
    },
    MemSize {
        ours: u64,
        base: u64,
    },
    Kernel {
        ours: u64,
        base: u64,
    },
    Abi {
        ours: u64,
        base: u64,
    },
}

impl Difference {
    /// Differences that come from the vmm build, not from the function's options: only a
    /// base made again with this vmm can fix them.
    fn needs_new_base(&self) -> bool {
        matches!(self, Difference::Kernel { .. } | Difference::Abi { .. })
    }

    fn describe(&self, base_name: &str) -> String {
        match self {
            Difference::Module {
                ours,
                ours_hash,
                base,
                base_hash,
            } => format!(
                "the module {ours} (xxh3-128 {ours_hash:032x}) differs from {base_name}'s module {base} (xxh3-128 {base_hash:032x})"
            ),
            Difference::Runtime { ours, base } => {
                format!("the runtime {ours} differs from {base_name}'s runtime {base}")
            }
            Difference::Engine { ours, base } => format!(
                "the WebAssembly engine {ours} differs from {base_name}'s engine {base} (a function layer runs in its base's engine)"
            ),
            Difference::MemSize { ours, base } => format!(
                "the guest memory size {} MiB differs from {base_name}'s {} MiB",
                ours >> 20,
                base >> 20
            ),
            Difference::Kernel { ours, base } => format!(
                "this vmm's guest kernel (xxh3-64 {ours:016x}) differs from the one {base_name} was made with ({base:016x})"
            ),
            Difference::Abi { ours, base } => format!(
                "this vmm's guest ABI version {ours} differs from {base_name}'s version {base}"
            ),
        }
    }
}

fn describe_all(differences: &[Difference], base: &TemplateName) -> String {
    let list: Vec<String> = differences
        .iter()
        .map(|d| d.describe(base.as_str()))
        .collect();
    let remedy = if differences.iter().any(Difference::needs_new_base) {
        format!(
            "{base} must be made again by this vmm (or the function layered on a base made by it)"
        )
    } else {
        format!(
            "a function layer runs its base's module, so give it the module, runtime, engine and memory size {base} was made with, or layer it on a base made from its own (without a base named, each module gets its own runtime base)"
        )
    };
    format!("{}; {remedy}", list.join("; "))
}

/// Why a template cannot be restored, or a function cannot be layered on a base.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("template {template}: {source}")]
    Vcpu {
        template: TemplateName,
        source: PersistError,
    },
    #[error("template {template}: the device state is damaged or forged ({reason}); recreate the template")]
    Device {
        template: TemplateName,
        reason: String,
    },
    #[error("template {template} was made by a newer vmm (device state version {version}; this vmm reads versions 1 to {DEVICE_STATE_VERSION}): use that vmm, or recreate the template with this one")]
    NewerDevice {
        template: TemplateName,
        version: u32,
    },
    #[error("template {child} is layered on {parent}, which is a function template, not a runtime base: {child}'s memory is a diff against the base it was made on, so it cannot be restored; remove {child} and create it again")]
    ParentNotABase {
        child: TemplateName,
        parent: TemplateName,
    },
    #[error("template {child} is a function template with no runtime base under it: its memory is a diff against the base it was made on, so it cannot be restored; remove {child} and create it again")]
    NoBase { child: TemplateName },
    #[error("runtime base {base} is layered on {parent}, but a runtime base is a whole snapshot of its own; remove {base} and create it again")]
    BaseHasParent {
        base: TemplateName,
        parent: TemplateName,
    },
    #[error("template {child} was made on runtime base {made_on}, but its manifest names {parent} as its parent: its memory is a diff against {made_on}'s, so it cannot be restored; remove {child} and create it again")]
    WrongBase {
        child: TemplateName,
        made_on: String,
        parent: TemplateName,
    },
    #[error("template {child} was made on an earlier runtime base named {parent}, which has since been replaced: its memory is a diff against the old base's, so it cannot be restored; remove {child} and create it again")]
    ReplacedBase {
        child: TemplateName,
        parent: TemplateName,
    },
    #[error("cannot layer {name} on {base}: {}", describe_all(.differences, .base))]
    BaseMismatch {
        name: TemplateName,
        base: TemplateName,
        differences: Vec<Difference>,
    },
    #[error("cannot layer {name} on {base}: {base} was made by an older vmm that did not record its module, runtime and memory size, so what {name} would run cannot be checked; layer {name} on a base made by this vmm (without a base named, each module gets its own), or remove {base} and the templates on it and create them again")]
    UnrecordedBase {
        name: TemplateName,
        base: TemplateName,
    },
}

/// Decode the vCPU and device state of `tmpl` and refuse any value restore would trip over.
pub fn check_states(tmpl: &Template) -> Result<(VcpuState, DeviceState), CheckError> {
    let vcpu = |source| CheckError::Vcpu {
        template: tmpl.name.clone(),
        source,
    };
    let state = VcpuState::decode(&tmpl.vcpu_state).map_err(vcpu)?;
    state.validate(tmpl.mem_size).map_err(vcpu)?;
    let device = decode_device(tmpl)?;
    check_device(&device, tmpl.mem_size).map_err(|reason| CheckError::Device {
        template: tmpl.name.clone(),
        reason,
    })?;
    Ok((state, device))
}

/// Decode `tmpl`'s device state (not yet range-checked: see [`check_states`]).
pub fn decode_device(tmpl: &Template) -> Result<DeviceState, CheckError> {
    DeviceState::decode(&tmpl.device_state).map_err(|e| match e {
        DeviceStateError::Newer(version) => CheckError::NewerDevice {
            template: tmpl.name.clone(),
            version,
        },
        DeviceStateError::Damaged(reason) => CheckError::Device {
            template: tmpl.name.clone(),
            reason,
        },
    })
}

fn check_device(d: &DeviceState, mem_size: u64) -> Result<(), String> {
    let what = match d.pending_op {
        op if op == Op::GetFunction as u64 => "function buffer",
        op if op == Op::ReadStdin as u64 => "request buffer",
        op => {
            return Err(format!(
                "it waits for hostcall {op}, which is not a snapshot point"
            ))
        }
    };
    GuestRange::checked(what, d.buf_gpa, d.buf_len, mem_size, mem_size)
        .map_err(|e| e.to_string())?;
    if !matches!(d.runtime.as_str(), "wasi" | "qjs" | "python") {
        return Err(format!("runtime {}", shown(&d.runtime)));
    }
    if d.version < 2 {
        return Ok(()); // nothing more was recorded
    }
    let Some(p) = &d.provenance else {
        return Err("it records no provenance".into());
    };
    if !ENGINES.contains(&p.engine.as_str()) {
        return Err(format!("engine {}", shown(&p.engine)));
    }
    if p.runtime != d.runtime || p.module_name != d.module_name || p.mem_size != mem_size {
        return Err(format!(
            "its provenance ({} module {}, {} MiB) disagrees with the template ({} module {}, {} MiB)",
            shown(&p.runtime),
            shown(&p.module_name),
            p.mem_size >> 20,
            shown(&d.runtime),
            shown(&d.module_name),
            mem_size >> 20
        ));
    }
    let is_base = d.pending_op == Op::GetFunction as u64;
    match &d.base {
        Some(_) if is_base => Err("a runtime base that names a base of its own".into()),
        None if !is_base => Err("a function template that does not name its base".into()),
        Some(b) if TemplateName::new(&b.name).is_err() => {
            Err(format!("base name {}", shown(&b.name)))
        }
        _ => Ok(()),
    }
}

fn is_base(d: &DeviceState) -> bool {
    d.pending_op == Op::GetFunction as u64
}

/// Check that `child` (whose device state is `device`) sits on the right parent: a runtime
/// base has none; a function template is layered on the runtime base it was made on.
/// `parent` is the parent's manifest and device state when they could be read (without
/// them only the kind of `child` itself is checked).
pub fn check_layering(
    child: &Template,
    device: &DeviceState,
    parent: Option<(&Template, &DeviceState)>,
) -> Result<(), CheckError> {
    let name = || child.name.clone();
    match (&child.parent, is_base(device)) {
        (None, true) => Ok(()),
        (Some(p), true) => Err(CheckError::BaseHasParent {
            base: name(),
            parent: p.clone(),
        }),
        (None, false) => Err(CheckError::NoBase { child: name() }),
        (Some(p), false) => {
            let Some((pt, pd)) = parent else {
                return Ok(());
            };
            if !is_base(pd) {
                return Err(CheckError::ParentNotABase {
                    child: name(),
                    parent: p.clone(),
                });
            }
            if let Some(b) = &device.base {
                if b.name != p.as_str() {
                    return Err(CheckError::WrongBase {
                        child: name(),
                        made_on: shown(&b.name),
                        parent: p.clone(),
                    });
                }
                if b.created_unix_ms != pt.created_unix_ms
                    || device
                        .provenance
                        .as_ref()
                        .is_some_and(|c| !pd.provenance.as_ref().is_some_and(|p| p.same_code(c)))
                {
                    return Err(CheckError::ReplacedBase {
                        child: name(),
                        parent: p.clone(),
                    });
                }
            }
            Ok(())
        }
    }
}

/// Check that a new function layer `name`, asking for `ours`, may be layered on `base`
/// (whose device state is `base_device`).
pub fn check_base_for_layer(
    name: &TemplateName,
    ours: &Provenance,
    base: &Template,
    base_device: &DeviceState,
) -> Result<(), CheckError> {
    check_layering(base, base_device, None)?;
    check_provenance(name, &base.name, ours, base_device.provenance.as_ref())
}

/// Check that what a new function layer `name` asks for (`ours`) is what its base `base`
/// was made from (`theirs`; `None` for a base that did not record it).
pub fn check_provenance(
    name: &TemplateName,
    base: &TemplateName,
    ours: &Provenance,
    theirs: Option<&Provenance>,
) -> Result<(), CheckError> {
    let Some(theirs) = theirs else {
        return Err(CheckError::UnrecordedBase {
            name: name.clone(),
            base: base.clone(),
        });
    };
    let differences = ours.differences(theirs);
    if differences.is_empty() {
        Ok(())
    } else {
        Err(CheckError::BaseMismatch {
            name: name.clone(),
            base: base.clone(),
            differences,
        })
    }
}

/// A template that restore would refuse, found by [`check_store`].
#[derive(Debug)]
pub struct Finding {
    pub template: TemplateName,
    pub error: CheckError,
}

/// Run the checks restore runs on every template in `store` whose manifest loads
/// (manifests, packs and parent chains themselves are the store's own `verify`'s job).
pub fn check_store(store: &Store) -> Vec<Finding> {
    let mut names: Vec<TemplateName> = std::fs::read_dir(store.dir().join("templates"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let f = e.file_name();
                    let stem = f.to_str()?.strip_suffix(".tmpl")?;
                    TemplateName::new(stem).ok()
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let mut findings = Vec::new();
    for name in names {
        let Ok(t) = store.load(name.as_str()) else {
            continue;
        };
        let device = match check_states(&t) {
            Ok((_, d)) => d,
            Err(error) => {
                findings.push(Finding {
                    template: name,
                    error,
                });
                continue;
            }
        };
        // A parent that does not load or decode is reported on its own.
        let parent = t.parent.as_ref().and_then(|p| {
            let pt = store.load(p.as_str()).ok()?;
            let pd = decode_device(&pt).ok()?;
            Some((pt, pd))
        });
        if let Err(error) = check_layering(&t, &device, parent.as_ref().map(|(t, d)| (t, d))) {
            findings.push(Finding {
                template: name,
                error,
            });
        }
    }
    findings
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

/// Most page-table pages [`check_w_xor_x`] walks (as many as a template may have).
const MAX_WALKED_TABLES: usize = 8192;

/// W^X of a template's page tables (the guest's, rooted at `layout::PML4_GPA`, in guest
/// memory of `mem_size` bytes whose 8-byte word at guest address `gpa` `entry` reads):
/// refused, naming the first offence, when
/// * a page is mapped writable and executable (rights combined over every level);
/// * memory mapped executable anywhere is also mapped writable anywhere;
/// * a page-table page is writable through any mapping but the alias window
///   (PML4 slot `layout::ALIAS_PML4_SLOT`, through which the guest kernel edits them);
/// * a table is reached at two levels, or with more rights than where it was first found
///   (the guest's own tables are a tree), or there are more than 8192 tables.
///
/// Templates made by a guest kernel without W^X fail the first rule: they must be made
/// again. Tables and pages beyond guest RAM are not followed (the guest faults there).
pub fn check_w_xor_x(
    mem_size: u64,
    mut entry: impl FnMut(u64) -> Result<u64, String>,
) -> Result<(), String> {
    use std::collections::btree_map::Entry;
    use vmm_abi::layout::{ALIAS_PML4_SLOT, PAGE_SIZE, PML4_GPA};
    use vmm_abi::pte::{ADDR_MASK, HUGE, NO_EXECUTE, PRESENT, WRITABLE};
    /// (depth, writable, executable, under the alias slot) of a table.
    type Rights = (u32, bool, bool, bool);
    let mut tables: std::collections::BTreeMap<u64, Rights> = Default::default();
    // Executable and writable (other than through the alias window) memory: [start, end).
    let mut exec: Vec<(u64, u64)> = Vec::new();
    let mut write: Vec<(u64, u64)> = Vec::new();
    let mut stack = vec![(PML4_GPA, (0u32, true, true, false))];
    while let Some((table, rights)) = stack.pop() {
        let (depth, w, x, alias) = rights;
        if table.saturating_add(PAGE_SIZE) > mem_size {
            continue;
        }
        match tables.entry(table) {
            Entry::Occupied(first) => {
                let (d0, w0, x0, a0) = *first.get();
                if d0 != depth || (w && !w0) || (x && !x0) || alias != a0 {
                    return Err(format!(
                        "its page table at {table:#x} is reached at two levels or with different rights"
                    ));
                }
                continue;
            }
            Entry::Vacant(v) => {
                v.insert(rights);
            }
        }
        if tables.len() > MAX_WALKED_TABLES {
            return Err(format!(
                "its page tables have more than {MAX_WALKED_TABLES} pages"
            ));
        }
        for i in 0..512u64 {
            let e = entry(table + i * 8)?;
            if e & PRESENT == 0 {
                continue;
            }
            let w = w && e & WRITABLE != 0;
            let x = x && e & NO_EXECUTE == 0;
            let alias = alias || (depth == 0 && i == ALIAS_PML4_SLOT);
            let len = match depth {
                3 => PAGE_SIZE,
                2 if e & HUGE != 0 => 1 << 21,
                1 if e & HUGE != 0 => 1 << 30,
                _ => {
                    stack.push((e & ADDR_MASK, (depth + 1, w, x, alias)));
                    continue;
                }
            };
            let start = e & ADDR_MASK & !(len - 1);
            if w && x {
                return Err(format!(
                    "its page tables map guest memory at {start:#x} both writable and executable (W^X): made by a guest kernel without W^X, or damaged; create it again"
                ));
            }
            let range = (start, start.saturating_add(len));
            if x {
                exec.push(range);
            }
            if w && !alias {
                write.push(range);
            }
        }
    }
    let merged = |mut v: Vec<(u64, u64)>| {
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (s, e) in v {
            match out.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        out
    };
    let exec = merged(exec);
    for (s, e) in merged(write) {
        // The first executable range that ends after `s`.
        let i = exec.partition_point(|r| r.1 <= s);
        if let Some(&(xs, _)) = exec.get(i).filter(|r| r.0 < e) {
            return Err(format!(
                "guest memory at {:#x} is mapped executable and, elsewhere, writable (W^X); create it again",
                xs.max(s)
            ));
        }
        if let Some((t, _)) = tables.range(s..e).next() {
            return Err(format!(
                "its page table at {t:#x} is writable through the guest's mappings; create it again"
            ));
        }
    }
    Ok(())
}

/// Synthetic vCPU and device states that pass every check above, for tests of tools that
/// build stores through the store API (`vmm-store`'s tests) and of this crate's unit
/// tests. Not a stable API.
#[cfg(any(test, feature = "fixtures"))]
#[doc(hidden)]
pub mod fixtures {
    use super::*;
    use crate::template::device::BaseRef;
    use kvm_bindings::{
        kvm_clock_data, kvm_debugregs, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    };
    use vmm_abi::layout;
    use zerocopy::IntoBytes;

    /// (vCPU state, device state) of a runtime base (`base` is `None`) or of a function
    /// template made on `base`, for a guest of `mem_size` bytes (at least 64 KiB).
    pub fn states(mem_size: u64, base: Option<BaseRef>) -> (Vec<u8>, Vec<u8>) {
        let regs = kvm_regs {
            rip: layout::KERNEL_BASE,
            rsp: layout::INITIAL_RSP,
            rflags: 2,
            ..Default::default()
        };
        let mut sregs = kvm_sregs {
            cr0: 0x8000_0011,
            cr3: layout::PML4_GPA,
            cr4: 0x20,
            efer: 0x500,
            ..Default::default()
        };
        sregs.cs.l = 1;
        sregs.cs.present = 1;
        sregs.tr.present = 1;
        for (t, at) in [(&mut sregs.gdt, 0x5000), (&mut sregs.idt, 0x6000)] {
            t.base = at;
            t.limit = 0xff;
        }
        sregs.tr.base = 0x7000;
        sregs.tr.limit = 0x67;
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].value = 1;
        let debugregs = kvm_debugregs {
            dr7: 0x400,
            ..Default::default()
        };
        let vcpu = VcpuState {
            version: crate::persist::VCPU_STATE_VERSION,
            backend: "pvm".into(),
            tsc_khz: 2_000_000,
            regs: regs.as_bytes().to_vec(),
            sregs: sregs.as_bytes().to_vec(),
            xsave: kvm_xsave::default().region.as_bytes().to_vec(),
            xcrs: xcrs.as_bytes().to_vec(),
            events: kvm_vcpu_events::default().as_bytes().to_vec(),
            debugregs: debugregs.as_bytes().to_vec(),
            msrs: vec![(crate::platform::MSR_PVM_VIF, layout::VIF_GPA | 0x400)],
            clock: kvm_clock_data::default().as_bytes().to_vec(),
        };
        let op = if base.is_some() {
            Op::ReadStdin
        } else {
            Op::GetFunction
        };
        let device = DeviceState {
            version: DEVICE_STATE_VERSION,
            pending_op: op as u64,
            buf_gpa: 0x8000,
            buf_len: 0x1000,
            runtime: "wasi".into(),
            module_name: "fixture.wasm".into(),
            args: vec![],
            provenance: Some(Provenance {
                module_hash: 1,
                module_name: "fixture.wasm".into(),
                runtime: "wasi".into(),
                engine: ENGINES[0].into(),
                mem_size,
                kernel_hash: 1,
                abi_version: vmm_abi::ABI_VERSION,
            }),
            base,
        };
        (vcpu.encode(), device.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::device::BaseRef;
    use snapshot_store::fixtures::TempDir;

    const MEM: u64 = 64 << 20;

    fn device(base: Option<BaseRef>) -> DeviceState {
        DeviceState::decode(&fixtures::states(MEM, base).1).unwrap()
    }
    fn base_ref(name: &str) -> Option<BaseRef> {
        Some(BaseRef {
            name: name.into(),
            created_unix_ms: 1,
        })
    }
    /// Why `check_device` refuses `d` (panics if it accepts it).
    fn refused(d: &DeviceState) -> String {
        check_device(d, MEM).unwrap_err()
    }

    #[test]
    fn device_state_of_a_base_and_of_a_function() {
        check_device(&device(None), MEM).unwrap();
        check_device(&device(base_ref("rt")), MEM).unwrap();
        // Only the two snapshot points.
        let mut d = device(None);
        d.pending_op = 99;
        assert!(refused(&d).contains("hostcall 99"));
        // The buffer lies inside guest memory.
        let mut d = device(None);
        d.buf_gpa = MEM - 0x800;
        assert!(refused(&d).contains("function buffer"));
        let mut d = device(base_ref("rt"));
        d.buf_len = MEM;
        assert!(refused(&d).contains("request buffer"));
        let mut d = device(None);
        d.runtime = "ruby".into();
        d.provenance.as_mut().unwrap().runtime = "ruby".into();
        assert_eq!(refused(&d), "runtime ruby");
    }

    #[test]
    fn device_state_provenance_and_base() {
        let mut d = device(None);
        d.provenance = None;
        assert!(refused(&d).contains("no provenance"));
        // Version 1 recorded none: nothing more is checked.
        d.version = 1;
        check_device(&d, MEM).unwrap();
        let mut d = device(None);
        d.provenance.as_mut().unwrap().engine = "v8".into();
        assert_eq!(refused(&d), "engine v8");
        // The provenance agrees with the template itself.
        let mut d = device(None);
        d.provenance.as_mut().unwrap().mem_size = MEM / 2;
        assert!(refused(&d).contains("disagrees"));
        let mut d = device(None);
        d.module_name = "other.wasm".into();
        assert!(refused(&d).contains("disagrees"));
        // A base names no base; a function template names a valid one.
        let mut d = device(None);
        d.base = base_ref("rt");
        assert!(refused(&d).contains("names a base of its own"));
        let mut d = device(base_ref("rt"));
        d.base = None;
        assert!(refused(&d).contains("does not name its base"));
        let d = device(base_ref("../rt"));
        assert!(refused(&d).contains("base name"));
    }

    #[test]
    fn provenance_differences_name_each_option() {
        let ours = device(None).provenance.unwrap();
        assert_eq!(ours.differences(&ours), vec![]);
        let mut base = ours.clone();
        base.engine = "wasmi".into();
        base.mem_size = MEM * 2;
        assert_eq!(
            ours.differences(&base),
            vec![
                Difference::Engine {
                    ours: "wasmtime".into(),
                    base: "wasmi".into()
                },
                Difference::MemSize {
                    ours: MEM,
                    base: MEM * 2
                },
            ]
        );
        let (name, base_name) = (
            TemplateName::new("f").unwrap(),
            TemplateName::new("rt").unwrap(),
        );
        check_provenance(&name, &base_name, &ours, Some(&ours)).unwrap();
        assert!(matches!(
            check_provenance(&name, &base_name, &ours, Some(&base)),
            Err(CheckError::BaseMismatch { differences, .. }) if differences.len() == 2
        ));
        assert!(matches!(
            check_provenance(&name, &base_name, &ours, None),
            Err(CheckError::UnrecordedBase { .. })
        ));
        // A kernel or ABI difference asks for a new base, the others for other options.
        let mut old = ours.clone();
        old.kernel_hash += 1;
        let e = check_provenance(&name, &base_name, &ours, Some(&old)).unwrap_err();
        assert!(e.to_string().contains("must be made again"), "{e}");
        let e = check_provenance(&name, &base_name, &ours, Some(&base)).unwrap_err();
        assert!(!e.to_string().contains("must be made again"), "{e}");
    }

    /// Commits `name` (on `parent`) with the fixture states of a base (`base` None) or of
    /// a function made on `base`.
    fn put(s: &mut Store, name: &str, parent: Option<&str>, base: Option<BaseRef>) {
        let (vcpu, device) = fixtures::states(MEM, base);
        let mut w = s.begin_template(name, parent, MEM).unwrap();
        w.set_vcpu_state(vcpu);
        w.set_device_state(device);
        w.commit().unwrap();
    }

    #[test]
    fn check_store_finds_every_template_restore_would_refuse() {
        let dir = TempDir::new();
        let mut s = Store::create_or_open(dir.path()).unwrap();
        put(&mut s, "rt", None, None);
        let rt = BaseRef {
            name: "rt".into(),
            created_unix_ms: s.load("rt").unwrap().created_unix_ms,
        };
        put(&mut s, "f", Some("rt"), Some(rt.clone()));
        assert!(check_store(&s).is_empty());

        put(&mut s, "a-base-on-rt", Some("rt"), None);
        put(&mut s, "b-on-f", Some("f"), Some(rt.clone()));
        put(&mut s, "c-alone", None, Some(rt.clone()));
        let other = BaseRef {
            name: "other".into(),
            ..rt.clone()
        };
        put(&mut s, "d-made-on-other", Some("rt"), Some(other));
        let older = BaseRef {
            created_unix_ms: rt.created_unix_ms - 1,
            ..rt.clone()
        };
        put(&mut s, "e-on-old-rt", Some("rt"), Some(older));
        let mut w = s.begin_template("g-bad-vcpu", None, MEM).unwrap();
        w.set_vcpu_state(vec![1, 2, 3]);
        w.set_device_state(fixtures::states(MEM, None).1);
        w.commit().unwrap();

        let found: Vec<(String, &str)> = check_store(&s)
            .iter()
            .map(|f| {
                let kind = match f.error {
                    CheckError::BaseHasParent { .. } => "base has parent",
                    CheckError::ParentNotABase { .. } => "parent not a base",
                    CheckError::NoBase { .. } => "no base",
                    CheckError::WrongBase { .. } => "wrong base",
                    CheckError::ReplacedBase { .. } => "replaced base",
                    CheckError::Vcpu { .. } => "vcpu",
                    _ => "other",
                };
                (f.template.to_string(), kind)
            })
            .collect();
        assert_eq!(
            found,
            vec![
                ("a-base-on-rt".to_string(), "base has parent"),
                ("b-on-f".to_string(), "parent not a base"),
                ("c-alone".to_string(), "no base"),
                ("d-made-on-other".to_string(), "wrong base"),
                ("e-on-old-rt".to_string(), "replaced base"),
                ("g-bad-vcpu".to_string(), "vcpu"),
            ]
        );
    }

    /// Guest memory of `pages` pages with `entries` ((table, index, value)) set.
    fn tables(pages: u64, entries: &[(u64, u64, u64)]) -> Vec<u8> {
        let mut m = vec![0u8; pages as usize * 4096];
        for &(t, i, v) in entries {
            let at = (t + i * 8) as usize;
            m[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        m
    }
    fn wx(m: &[u8]) -> Result<(), String> {
        check_w_xor_x(m.len() as u64, |gpa| {
            let at = gpa as usize;
            Ok(u64::from_le_bytes(m[at..at + 8].try_into().unwrap()))
        })
    }

    #[test]
    fn w_xor_x_of_the_page_tables() {
        use vmm_abi::layout::{ALIAS_PML4_SLOT, PML4_GPA};
        use vmm_abi::pte::{HUGE, LEAF_CODE, LEAF_DATA, LEAF_READ_ONLY, NO_EXECUTE, TABLE};
        let (pdpt, pd, pt, apdpt, apd) = (0x3000, 0x4000, 0x5000, 0x6000, 0x7000);
        // The loader's shape: tables in the first 2 MiB, read-only there; code R+X; data
        // RW+NX; the alias window writes the tables.
        let good = [
            (PML4_GPA, 0, pdpt | TABLE),
            (PML4_GPA, ALIAS_PML4_SLOT, apdpt | TABLE),
            (apdpt, 0, apd | TABLE),
            (apd, 0, LEAF_DATA | HUGE),
            (pdpt, 0, pd | TABLE),
            (pd, 0, pt | TABLE),
            (pt, 2, PML4_GPA | LEAF_READ_ONLY),
            (pt, 8, 0x8000 | LEAF_DATA),
            (pd, 1, 0x20_0000 | LEAF_CODE | HUGE),
            (pd, 2, 0x40_0000 | LEAF_READ_ONLY | HUGE),
            (pd, 3, 0x60_0000 | LEAF_DATA | HUGE),
        ];
        let pages = 8 << 8; // 8 MiB
        wx(&tables(pages, &good)).unwrap();
        let with = |e: (u64, u64, u64)| {
            let mut v = good.to_vec();
            v.push(e);
            wx(&tables(pages, &v)).unwrap_err()
        };
        // A W+X page; the rights of every level combine (NX above, W below: fine).
        let e = with((pd, 4, 0x80_0000 | TABLE | HUGE));
        assert!(e.contains("0x800000 both writable and executable"), "{e}");
        wx(&tables(
            pages,
            &[
                (PML4_GPA, 0, pdpt | TABLE | NO_EXECUTE),
                (pdpt, 0, pd | TABLE),
                (pd, 1, 0x20_0000 | TABLE | HUGE),
            ],
        ))
        .unwrap();
        // Code also writable through another mapping (here a 4 KiB alias of it).
        let e = with((pt, 9, 0x20_1000 | LEAF_DATA));
        assert!(e.contains("0x201000 is mapped executable"), "{e}");
        // A page table writable outside the alias window.
        let e = with((pt, 3, pdpt | LEAF_DATA));
        assert!(e.contains("page table at 0x3000 is writable"), "{e}");
        // A table reached twice with different rights, or at two levels.
        let e = with((pd, 5, pt | TABLE | NO_EXECUTE));
        assert!(e.contains("two levels or with different rights"), "{e}");
        let e = with((pdpt, 1, pt | TABLE));
        assert!(e.contains("two levels or with different rights"), "{e}");
        // Before W^X: every page read-write-execute.
        let e = wx(&tables(
            pages,
            &[
                (PML4_GPA, 0, pdpt | TABLE),
                (pdpt, 0, pd | TABLE),
                (pd, 1, 0x20_0000 | TABLE | HUGE),
            ],
        ))
        .unwrap_err();
        assert!(e.contains("made by a guest kernel without W^X"), "{e}");
    }
}
