//! The VMM's side of a hostcall, apart from the vCPU: what an exit to the hostcall port
//! does to guest memory, the instance's output, its grants and its memory slots, and what
//! the vCPU loop does next. [`Vm::next_hostcall`](crate::vm::Vm::next_hostcall) runs the
//! vCPU and hands every port-I/O exit to [`handle_exit`]; the fuzz target
//! `fuzz/fuzz_targets/hostcall.rs` drives the same function in-process, with no KVM, over
//! a [`SlotTable`] that records the memory slots instead of registering them.
//!
//! Everything the guest controls reaches this module: the port and value of its `out`, the
//! mailbox page and the rest of guest memory. Requests are decoded by
//! `vmm_abi::decode_request`, which range-checks every address and length; any malformed
//! request stops the guest with [`GuestError::BadHostcall`].

use crate::memory::{GuestMemory, MemoryError};
use crate::vm::{Grants, GuestError, Hostcall, Output, RunError, VmError};
use vmm_abi::{layout, offsets, Mailbox, Request, MAILBOX_BYTES};

/// Where the memory slots of an instance's grants are registered: KVM for a real VM
/// ([`crate::vm::Vm`]), a record for the fuzz target. Slot ids are dense: a new slot takes
/// the next id, and slots are only deleted all together ([`Grants::rebuild_slots`]).
pub trait SlotTable {
    /// Register `[gpa, gpa + len)` of guest RAM (checked to lie inside it) as slot `id`.
    fn add(&mut self, id: u32, gpa: u64, len: u64) -> Result<(), VmError>;
    /// Delete slot `id`, which covers `[gpa, gpa + len)`.
    fn delete(&mut self, id: u32, gpa: u64, len: u64) -> Result<(), VmError>;
}

/// What the VMM answers the guest's requests for its function and its input with, and how
/// much of the input it has handed over: the per-run state of [`handle_exit`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Answers<'a> {
    /// The function config blob for `GetFunction`: taken once the guest's buffer held it
    /// (a guest whose buffer was too small is told the length and asks again).
    pub function: Option<&'a [u8]>,
    /// The request body for `ReadStdin`, handed over in chunks of the guest's buffer.
    pub stdin: Option<&'a [u8]>,
    /// Bytes of `stdin` handed over so far.
    pub stdin_pos: usize,
}

/// What the vCPU loop does after a hostcall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Served, the result written to the mailbox: run the guest on.
    Resume,
    /// A hostcall this run cannot answer (`GetFunction`/`ReadStdin` without an answer) or
    /// the guest's exit: stop and hand it to the caller.
    Stop(Hostcall),
}

/// Everything a hostcall may touch besides the guest's registers.
pub struct Context<'a, 'b, S: SlotTable> {
    pub mem: &'a GuestMemory,
    pub grants: &'a mut Grants,
    pub slots: &'a mut S,
    pub out: &'a mut Output,
    pub answers: &'a mut Answers<'b>,
}

/// Serve the port-I/O exit of an `out` to `port` (the bytes it wrote: `value`): a
/// hostcall if `port` is the hostcall port, with its request read from the mailbox page.
pub fn handle_exit<S: SlotTable>(
    port: u16,
    value: &[u8],
    cx: &mut Context<'_, '_, S>,
) -> Result<Next, RunError> {
    if port != vmm_abi::HOSTCALL_PORT {
        return Err(GuestError::UnexpectedExit(format!(
            "port I/O to unknown port {port:#x} ({} bytes written)",
            value.len()
        ))
        .into());
    }
    let mut b = [0u8; MAILBOX_BYTES];
    cx.mem.read_into(layout::MAILBOX_GPA, &mut b)?;
    let mb = Mailbox::from_bytes(&b);
    let req = vmm_abi::decode_request(&mb, cx.mem.size()).map_err(GuestError::BadHostcall)?;
    serve(req, cx)
}

/// Serve a decoded request.
pub fn serve<S: SlotTable>(req: Request, cx: &mut Context<'_, '_, S>) -> Result<Next, RunError> {
    let mem = cx.mem;
    match req {
        Request::GetFunction { buf } => answer(Hostcall::GetFunction { buf }, cx),
        Request::ReadStdin { buf } => answer(Hostcall::ReadStdin { buf }, cx),
        Request::Write { fd, data } => {
            cx.out.append(fd, mem, data)?;
            complete(mem, 0, 0, false)?;
            Ok(Next::Resume)
        }
        Request::Grant { range } => {
            cx.grants
                .grant(&mut *cx.slots, mem, range.gpa, range.len)
                .map_err(RunError::Vm)?;
            complete(mem, 0, 0, false)?;
            Ok(Next::Resume)
        }
        Request::Exit {
            code,
            stdout,
            stderr,
            flags,
        } => {
            cx.out.append(1, mem, stdout)?;
            cx.out.append(2, mem, stderr)?;
            if flags & vmm_abi::EXIT_STDOUT_TRUNCATED != 0 {
                cx.out.truncated.stdout = true;
            }
            if flags & vmm_abi::EXIT_STDERR_TRUNCATED != 0 {
                cx.out.truncated.stderr = true;
            }
            Ok(Next::Stop(Hostcall::Exit { code }))
        }
        Request::Fault {
            vector,
            error_code,
            rip,
            cr2,
            rsp,
        } => Err(GuestError::Fault {
            vector,
            name: vmm_abi::exception_name(vector),
            error_code,
            rip,
            cr2,
            rsp,
        }
        .into()),
        Request::Panic { message, kind } => {
            let msg =
                String::from_utf8_lossy(&mem.read_vec(message.gpa, message.len)?).into_owned();
            Err(if kind == vmm_abi::PANIC_OUT_OF_MEMORY {
                GuestError::OutOfMemory(msg)
            } else {
                GuestError::Panic(msg)
            }
            .into())
        }
        Request::Error { code, message } => {
            let msg =
                String::from_utf8_lossy(&mem.read_vec(message.gpa, message.len)?).into_owned();
            Err(if code == vmm_abi::ERR_MODULE_INVALID {
                GuestError::ModuleInvalid(msg)
            } else {
                GuestError::Runtime(msg)
            }
            .into())
        }
    }
}

/// Answer `call` (a hostcall the guest waits in) from `cx.answers` if it can be: the
/// function config (once it fitted), or the next chunk of stdin. Otherwise, or for an
/// exit, stop there.
pub fn answer<S: SlotTable>(call: Hostcall, cx: &mut Context<'_, '_, S>) -> Result<Next, RunError> {
    let mem = cx.mem;
    let a = &mut *cx.answers;
    match (call, a.function, a.stdin) {
        (Hostcall::GetFunction { buf }, Some(config), _) => {
            // The guest learns the length from `ret`; a buffer too small gets nothing
            // written and the guest asks again with one large enough, which is answered too.
            if config.len() as u64 <= buf.len {
                mem.write(buf.gpa, config)?;
                a.function = None;
            }
            complete(mem, config.len() as u64, 0, true)?;
            Ok(Next::Resume)
        }
        (Hostcall::ReadStdin { buf }, _, Some(stdin)) => {
            let pos = a.stdin_pos.min(stdin.len());
            let n = (stdin.len() - pos).min(usize::try_from(buf.len).unwrap_or(usize::MAX));
            mem.write(buf.gpa, &stdin[pos..pos + n])?;
            a.stdin_pos = pos + n;
            complete(mem, n as u64, (a.stdin_pos == stdin.len()) as u64, true)?;
            Ok(Next::Resume)
        }
        (call, _, _) => Ok(Next::Stop(call)),
    }
}

/// Answer the pending hostcall: result words, the current wall clock and, if asked,
/// fresh entropy for the guest's CSPRNG.
pub fn complete(
    mem: &GuestMemory,
    ret: u64,
    ret2: u64,
    fresh_entropy: bool,
) -> Result<(), MemoryError> {
    let base = layout::MAILBOX_GPA;
    mem.write_u64(base + offsets::RET as u64, ret)?;
    mem.write_u64(base + offsets::RET2 as u64, ret2)?;
    if fresh_entropy {
        let mut seed = [0u8; 32];
        crate::vm::fill_random(&mut seed);
        mem.write(base + offsets::ENTROPY as u64, &seed)?;
        let mut word = [0u8; 8];
        mem.read_into(base + offsets::ENTROPY_GEN as u64, &mut word)?;
        let gen = u64::from_le_bytes(word).wrapping_add(1);
        mem.write_u64(base + offsets::ENTROPY_GEN as u64, gen)?;
    }
    mem.write_u64(base + offsets::NOW_UNIX_NS as u64, crate::vm::unix_now_ns())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::MAX_SLOTS;

    const MIB: u64 = 1 << 20;

    /// Memory slots as KVM would hold them, refusing what KVM refuses (overlap, reuse).
    #[derive(Default)]
    struct Recorded(Vec<Option<(u64, u64)>>);

    impl SlotTable for Recorded {
        fn add(&mut self, id: u32, gpa: u64, len: u64) -> Result<(), VmError> {
            let id = id as usize;
            if self.0.len() <= id {
                self.0.resize(id + 1, None);
            }
            assert!(self.0[id].is_none(), "slot {id} reused");
            for &(a, l) in self.0.iter().flatten() {
                assert!(gpa + len <= a || a + l <= gpa, "overlapping slots");
            }
            self.0[id] = Some((gpa, len));
            Ok(())
        }
        fn delete(&mut self, id: u32, gpa: u64, len: u64) -> Result<(), VmError> {
            assert_eq!(self.0[id as usize].take(), Some((gpa, len)));
            Ok(())
        }
    }

    fn call(mem: &GuestMemory, op: u64, args: &[u64]) {
        let base = layout::MAILBOX_GPA;
        mem.write_u64(base + offsets::OP as u64, op).unwrap();
        for i in 0..6 {
            let v = args.get(i).copied().unwrap_or(0);
            mem.write_u64(base + (offsets::ARGS + 8 * i) as u64, v)
                .unwrap();
        }
    }

    fn ret(mem: &GuestMemory) -> u64 {
        let b = mem
            .read_vec(layout::MAILBOX_GPA + offsets::RET as u64, 8)
            .unwrap();
        u64::from_le_bytes(b.try_into().unwrap())
    }

    #[test]
    fn a_function_config_larger_than_the_first_buffer_is_given_on_the_retry() {
        // Regression: the config was taken at the first GetFunction even when it did not
        // fit, so the guest's retry with a buffer of the announced size stopped the run.
        let mem = GuestMemory::new((64 * MIB) as usize).unwrap();
        let mut grants = Grants::fixed(mem.size());
        let mut slots = Recorded::default();
        grants.register_slots(&mut slots, &mem).unwrap();
        let mut out = Output::new(1024);
        let config = vec![0xa5u8; 5000];
        let mut answers = Answers {
            function: Some(&config),
            ..Default::default()
        };
        let mut cx = Context {
            mem: &mem,
            grants: &mut grants,
            slots: &mut slots,
            out: &mut out,
            answers: &mut answers,
        };
        call(&mem, 1, &[0x10_0000, 4096]);
        let port = vmm_abi::HOSTCALL_PORT;
        assert_eq!(handle_exit(port, &[0], &mut cx).unwrap(), Next::Resume);
        assert_eq!(ret(&mem), 5000, "the length it needs");
        assert_eq!(mem.read_vec(0x10_0000, 1).unwrap(), [0], "nothing written");
        call(&mem, 1, &[0x10_0000, 5000]);
        assert_eq!(handle_exit(port, &[0], &mut cx).unwrap(), Next::Resume);
        assert_eq!(mem.read_vec(0x10_0000, 5000).unwrap(), config);
        // Once given, a third request stops the run (a base template is taken there).
        assert_eq!(
            handle_exit(port, &[0], &mut cx).unwrap(),
            Next::Stop(Hostcall::GetFunction {
                buf: vmm_abi::GuestRange {
                    gpa: 0x10_0000,
                    len: 5000
                }
            })
        );
    }

    #[test]
    fn a_grant_of_granted_regions_rewrites_a_grant_map_the_guest_overwrote() {
        // Found by the hostcall fuzz target: a guest that wrote over its grant map (here a
        // read of stdin into it) and then asked for regions already granted kept the wrong
        // map: only a grant of new regions rewrote it.
        let mem = GuestMemory::new((64 * MIB) as usize).unwrap();
        let mut grants = Grants::fixed(mem.size());
        let mut slots = Recorded::default();
        grants.register_slots(&mut slots, &mem).unwrap();
        let mut out = Output::new(0);
        let body = [0xffu8; 8];
        let mut answers = Answers {
            stdin: Some(&body),
            ..Default::default()
        };
        let mut cx = Context {
            mem: &mem,
            grants: &mut grants,
            slots: &mut slots,
            out: &mut out,
            answers: &mut answers,
        };
        let port = vmm_abi::HOSTCALL_PORT;
        call(&mem, 2, &[layout::GRANT_MAP_GPA, 8]);
        assert_eq!(handle_exit(port, &[0], &mut cx).unwrap(), Next::Resume);
        assert_eq!(mem.read_vec(layout::GRANT_MAP_GPA, 8).unwrap(), [0xff; 8]);
        call(&mem, 8, &[0, 2 * MIB]);
        assert_eq!(handle_exit(port, &[0], &mut cx).unwrap(), Next::Resume);
        let map = mem
            .read_vec(layout::GRANT_MAP_GPA, layout::GRANT_MAP_BYTES as u64)
            .unwrap();
        assert_eq!(map, cx.grants.map());
        assert_eq!(cx.slots.0.iter().flatten().count(), 2, "no new slot");
    }

    #[test]
    fn a_fragmented_grant_map_from_a_template_is_registered_as_few_slots() {
        // Found by the hostcall fuzz target: a grant map whose regions alternate (a
        // template's map is what its guest left in guest memory) was registered as one slot
        // per run (1024 for 4 GiB of RAM, each an SRCU synchronize on every restore),
        // beyond MAX_SLOTS.
        let size = 4096 * MIB;
        let mem = GuestMemory::new(size as usize).unwrap();
        let mut grants = Grants::fixed(size);
        grants.add_map(&[0x55; layout::GRANT_MAP_BYTES]).unwrap();
        let mut slots = Recorded::default();
        grants.register_slots(&mut slots, &mem).unwrap();
        assert!(grants.slots() <= MAX_SLOTS, "{} slots", grants.slots());
        assert_eq!(slots.0.iter().flatten().count(), grants.slots());
        assert_eq!(grants.runs(), vec![(0, size - 2 * MIB)]);
        let map = mem
            .read_vec(layout::GRANT_MAP_GPA, layout::GRANT_MAP_BYTES as u64)
            .unwrap();
        assert_eq!(map, grants.map(), "the guest is told what it has");
    }

    #[test]
    fn hostile_exits_end_with_clear_errors_and_fragmenting_grants_stay_few_slots() {
        let mem = GuestMemory::new((512 * MIB) as usize).unwrap();
        let mut grants = Grants::fixed(mem.size());
        let mut slots = Recorded::default();
        grants.register_slots(&mut slots, &mem).unwrap();
        let mut out = Output::new(100);
        let mut answers = Answers::default();
        let mut cx = Context {
            mem: &mem,
            grants: &mut grants,
            slots: &mut slots,
            out: &mut out,
            answers: &mut answers,
        };
        let port = vmm_abi::HOSTCALL_PORT;
        let e = handle_exit(0x3f8, b"x", &mut cx).unwrap_err();
        assert!(e.to_string().contains("unknown port 0x3f8"), "{e}");
        // Every other region: more runs than slots allowed, so they are merged.
        for r in (12..256).step_by(2) {
            call(&mem, 8, &[r * 2 * MIB, 2 * MIB]);
            assert_eq!(handle_exit(port, &[0], &mut cx).unwrap(), Next::Resume);
        }
        assert!(cx.grants.slots() <= MAX_SLOTS, "{}", cx.grants.slots());
        assert_eq!(cx.slots.0.iter().flatten().count(), cx.grants.slots());
        // Out of range, unaligned, oversized: refused, naming what.
        for (op, args, what) in [
            (8u64, vec![511 * 2 * MIB, 4 * MIB], "outside guest memory"),
            (8, vec![MIB, 2 * MIB], "2 MiB regions"),
            (
                3,
                vec![1, 0x1000, vmm_abi::MAX_TRANSFER_LEN + 1],
                "exceeds the limit",
            ),
            (6, vec![u64::MAX - 4, 8], "outside guest memory"),
            (99, vec![], "unknown hostcall op 99"),
        ] {
            call(&mem, op, &args);
            let e = handle_exit(port, &[0], &mut cx).unwrap_err().to_string();
            assert!(e.contains("malformed hostcall") && e.contains(what), "{e}");
        }
        // Output past the cap.
        call(&mem, 3, &[2, 0x1000, 101]);
        let e = handle_exit(port, &[0], &mut cx).unwrap_err().to_string();
        assert!(e.contains("more than 100 bytes of output"), "{e}");
        assert!(cx.out.stderr.is_empty() && cx.out.truncated.stderr);
    }
}
