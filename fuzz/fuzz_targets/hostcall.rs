//! The VMM's handling of every hostcall (`vmm::hostcall`), in-process and without KVM:
//! arbitrary sequences of exits (port, value) over arbitrary mailbox and guest-memory
//! contents, against a small guest RAM, a function config, a request body, an output cap
//! and the grants, whose memory slots are recorded by a [`SlotTable`] that checks what KVM
//! would be asked.
//!
//! Input: see `vmm_fuzz::hostcall_input`.
//!
//! Checked after every hostcall, beyond "no panic":
//! * the outcome is the one the request asks for: an unknown port or a malformed request
//!   is `UnexpectedExit`/`BadHostcall` with the decoder's error; an output past the cap is
//!   `OutputLimit` with nothing appended; fault, panic and error carry the guest's words
//!   and message; no host-side error (`RunError::Vm`) ever comes of guest input;
//! * the VMM wrote guest RAM only where the hostcall answers: `ret`, `ret2`, the clock and
//!   entropy words of the mailbox, the grant map, and the guest's buffer (exactly the
//!   config or the next chunk of the body); every other byte of the window is unchanged;
//! * the output holds exactly the bytes the guest handed over, never more than its cap;
//! * memory slots: dense ids, whole 2 MiB regions inside guest RAM, never overlapping, at
//!   most `MAX_SLOTS`, covering exactly the granted regions, which cover every region the
//!   guest asked for; after a grant, the grant map in guest RAM names exactly them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::hostcall::{self, Answers, Context, Next, SlotTable};
use vmm::memory::GuestMemory;
use vmm::vm::{Grants, GuestError, Hostcall, Output, RunError, VmError, MAX_SLOTS};
use vmm_abi::{layout, offsets, AbiError, Mailbox, Request, HOSTCALL_PORT, MAILBOX_BYTES};
use vmm_fuzz::hostcall_input::*;

/// What KVM would hold: slot id -> (gpa, len).
struct Slots {
    mem_size: u64,
    slots: Vec<Option<(u64, u64)>>,
}

impl SlotTable for Slots {
    fn add(&mut self, id: u32, gpa: u64, len: u64) -> Result<(), VmError> {
        let end = gpa.checked_add(len).expect("slot end overflows");
        assert!(len > 0, "empty slot {id} at {gpa:#x}");
        assert!(end <= self.mem_size, "slot {gpa:#x}+{len:#x} past RAM");
        assert!(
            gpa.is_multiple_of(REGION) && len.is_multiple_of(REGION),
            "slot {gpa:#x}+{len:#x} is not whole regions"
        );
        let id = id as usize;
        assert!(id < 32 * 1024, "slot id {id}");
        if self.slots.len() <= id {
            self.slots.resize(id + 1, None);
        }
        assert!(self.slots[id].is_none(), "slot id {id} reused while in use");
        for &(a, l) in self.slots.iter().flatten() {
            assert!(
                end <= a || a + l <= gpa,
                "slot {gpa:#x}+{len:#x} overlaps {a:#x}+{l:#x} (KVM refuses: EEXIST)"
            );
        }
        self.slots[id] = Some((gpa, len));
        Ok(())
    }

    fn delete(&mut self, id: u32, gpa: u64, len: u64) -> Result<(), VmError> {
        let s = self.slots.get_mut(id as usize).and_then(|s| s.take());
        assert_eq!(
            s,
            Some((gpa, len)),
            "deleted slot {id} is not what was added"
        );
        Ok(())
    }
}

fn check_grants(g: &Grants, slots: &Slots, mem: &GuestMemory, map_written: bool) {
    let mut live: Vec<(u64, u64)> = slots.slots.iter().flatten().copied().collect();
    assert_eq!(live.len(), g.slots(), "slots registered vs recorded");
    assert!(g.slots() <= MAX_SLOTS, "{} slots", g.slots());
    for (i, s) in g.slot_ranges().iter().enumerate() {
        assert_eq!(slots.slots.get(i).copied().flatten(), Some(*s), "slot {i}");
    }
    live.sort();
    // Merge adjacent slots: they must be exactly the granted runs.
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (a, l) in live {
        match merged.last_mut() {
            Some((ma, ml)) if *ma + *ml == a => *ml += l,
            _ => merged.push((a, l)),
        }
    }
    assert_eq!(merged, g.runs(), "slots vs granted regions");
    if map_written {
        // (The guest may overwrite its map, e.g. with a read of stdin: its own loss.)
        let mut map = [0u8; layout::GRANT_MAP_BYTES];
        mem.read_into(layout::GRANT_MAP_GPA, &mut map).unwrap();
        assert_eq!(map, g.map(), "grant map in guest RAM");
    }
}

fn covered(g: &Grants, gpa: u64, len: u64) -> bool {
    g.runs()
        .iter()
        .any(|&(a, l)| a <= gpa && gpa + len <= a + l)
}

/// Mailbox words the VMM writes when it completes a hostcall.
fn completion_bytes(at: u64) -> bool {
    let m = layout::MAILBOX_GPA;
    let word = |off: usize, n: u64| at >= m + off as u64 && at < m + off as u64 + n;
    word(offsets::RET, 8)
        || word(offsets::RET2, 8)
        || word(offsets::NOW_UNIX_NS, 8)
        || word(offsets::ENTROPY, 32)
        || word(offsets::ENTROPY_GEN, 8)
}

fn grant_map_byte(at: u64) -> bool {
    (layout::GRANT_MAP_GPA..layout::GRANT_MAP_GPA + layout::GRANT_MAP_BYTES as u64).contains(&at)
}

struct State<'a> {
    mem: GuestMemory,
    grants: Grants,
    slots: Slots,
    out: Output,
    answers: Answers<'a>,
    limit: usize,
}

/// One exit through `hostcall::handle_exit` (or an answer to `pending`), with every check.
/// Returns whether the guest may go on (it was resumed).
fn step(st: &mut State<'_>, port: u16, value: &[u8], pending: &mut Option<Hostcall>) -> bool {
    let size = st.mem.size();
    let mut before = vec![0u8; WINDOW as usize];
    st.mem.read_into(0, &mut before).unwrap();
    let mut mbb = [0u8; MAILBOX_BYTES];
    st.mem.read_into(layout::MAILBOX_GPA, &mut mbb).unwrap();
    let mb = Mailbox::from_bytes(&mbb);
    let out_before = (st.out.stdout.clone(), st.out.stderr.clone());
    let answers_before = st.answers;
    let answering = pending.is_some();
    // What the guest asks, as the target reads it.
    let asked: Result<Request, AbiError> = match *pending {
        Some(Hostcall::GetFunction { buf }) => Ok(Request::GetFunction { buf }),
        Some(Hostcall::ReadStdin { buf }) => Ok(Request::ReadStdin { buf }),
        Some(Hostcall::Exit { .. }) => unreachable!("no pending exit"),
        None => vmm_abi::decode_request(&mb, size),
    };
    let r = {
        let mut cx = Context {
            mem: &st.mem,
            grants: &mut st.grants,
            slots: &mut st.slots,
            out: &mut st.out,
            answers: &mut st.answers,
        };
        match pending.take() {
            Some(call) => hostcall::answer(call, &mut cx),
            None => hostcall::handle_exit(port, value, &mut cx),
        }
    };
    let total = st.out.stdout.len() + st.out.stderr.len();
    assert!(
        total <= st.limit,
        "output {total} past its cap {}",
        st.limit
    );
    let granted = !answering && port == HOSTCALL_PORT && matches!(asked, Ok(Request::Grant { .. }));
    check_grants(&st.grants, &st.slots, &st.mem, granted && r.is_ok());
    let mut after = vec![0u8; WINDOW as usize];
    st.mem.read_into(0, &mut after).unwrap();
    // Where the VMM may have written the guest's buffer, and what.
    let mut buffer: Option<(u64, Vec<u8>)> = None;
    let mut completed = false;
    let mut map_may_change = false;
    let unknown_port = !answering && port != HOSTCALL_PORT;
    if unknown_port {
        match &r {
            Err(RunError::Guest(GuestError::UnexpectedExit(m))) => {
                assert!(m.contains("unknown port"), "{m}")
            }
            other => panic!("port {port:#x}: {other:?}"),
        }
    } else {
        match (asked, &r) {
            (Err(e), Err(RunError::Guest(GuestError::BadHostcall(got)))) => assert_eq!(e, *got),
            (Err(e), other) => panic!("malformed request ({e}) served: {other:?}"),
            (Ok(_), Err(RunError::Vm(e))) => panic!("a host-side error of guest input: {e}"),
            (Ok(Request::GetFunction { buf }), r) => match answers_before.function {
                Some(config) => {
                    assert_eq!(*r.as_ref().unwrap(), Next::Resume);
                    completed = true;
                    let fits = config.len() as u64 <= buf.len;
                    assert_eq!(
                        st.answers.function.is_none(),
                        fits,
                        "function taken iff it fitted"
                    );
                    if fits {
                        buffer = Some((buf.gpa, config.to_vec()));
                    }
                    assert_eq!(
                        st.mem
                            .read_vec(layout::MAILBOX_GPA + offsets::RET as u64, 8)
                            .unwrap(),
                        (config.len() as u64).to_le_bytes()
                    );
                }
                None => assert_eq!(
                    *r.as_ref().unwrap(),
                    Next::Stop(Hostcall::GetFunction { buf })
                ),
            },
            (Ok(Request::ReadStdin { buf }), r) => match answers_before.stdin {
                Some(stdin) => {
                    assert_eq!(*r.as_ref().unwrap(), Next::Resume);
                    completed = true;
                    let pos = answers_before.stdin_pos;
                    let n = (stdin.len() - pos).min(buf.len as usize);
                    assert_eq!(st.answers.stdin_pos, pos + n);
                    buffer = Some((buf.gpa, stdin[pos..pos + n].to_vec()));
                    let ret = st
                        .mem
                        .read_vec(layout::MAILBOX_GPA + offsets::RET as u64, 16)
                        .unwrap();
                    assert_eq!(ret[..8], (n as u64).to_le_bytes());
                    assert_eq!(ret[8..], u64::from(pos + n == stdin.len()).to_le_bytes());
                }
                None => assert_eq!(
                    *r.as_ref().unwrap(),
                    Next::Stop(Hostcall::ReadStdin { buf })
                ),
            },
            (Ok(Request::Write { fd, data }), r) => {
                let fits = out_before.0.len() + out_before.1.len() + data.len as usize <= st.limit;
                let bytes = before_or_mem(&before, &st.mem, data.gpa, data.len);
                let mut want = if fd == 1 {
                    out_before.0.clone()
                } else {
                    out_before.1.clone()
                };
                if fits {
                    assert_eq!(*r.as_ref().unwrap(), Next::Resume);
                    completed = true;
                    want.extend_from_slice(&bytes);
                } else {
                    assert!(
                        matches!(r, Err(RunError::Guest(GuestError::OutputLimit(l))) if *l == st.limit),
                        "{r:?}"
                    );
                    assert!(if fd == 1 {
                        st.out.truncated.stdout
                    } else {
                        st.out.truncated.stderr
                    });
                }
                let got = if fd == 1 {
                    &st.out.stdout
                } else {
                    &st.out.stderr
                };
                assert!(
                    *got == want,
                    "fd {fd} output: {} bytes, want {} (before {}+{}, {data:?})",
                    got.len(),
                    want.len(),
                    out_before.0.len(),
                    out_before.1.len()
                );
            }
            (
                Ok(Request::Exit {
                    code,
                    stdout,
                    stderr,
                    ..
                }),
                r,
            ) => {
                let t = out_before.0.len() + out_before.1.len();
                if t + stdout.len as usize + stderr.len as usize <= st.limit {
                    assert_eq!(*r.as_ref().unwrap(), Next::Stop(Hostcall::Exit { code }));
                    let mut o = out_before.0.clone();
                    o.extend_from_slice(&before_or_mem(&before, &st.mem, stdout.gpa, stdout.len));
                    let mut e = out_before.1.clone();
                    e.extend_from_slice(&before_or_mem(&before, &st.mem, stderr.gpa, stderr.len));
                    assert!(
                        st.out.stdout == o,
                        "stdout: {} bytes, want {}",
                        st.out.stdout.len(),
                        o.len()
                    );
                    assert!(
                        st.out.stderr == e,
                        "stderr: {} bytes, want {}",
                        st.out.stderr.len(),
                        e.len()
                    );
                } else {
                    assert!(
                        matches!(r, Err(RunError::Guest(GuestError::OutputLimit(_)))),
                        "{r:?}"
                    );
                }
            }
            (
                Ok(Request::Fault {
                    vector,
                    error_code,
                    rip,
                    cr2,
                    rsp,
                }),
                r,
            ) => match r {
                Err(RunError::Guest(GuestError::Fault {
                    vector: v,
                    error_code: c,
                    rip: ip,
                    cr2: a,
                    rsp: sp,
                    name,
                })) => {
                    assert_eq!((*v, *c, *ip, *a, *sp), (vector, error_code, rip, cr2, rsp));
                    assert!(!name.is_empty());
                }
                other => panic!("fault: {other:?}"),
            },
            (Ok(Request::Panic { message, kind }), r) => {
                let want = String::from_utf8_lossy(&before_or_mem(
                    &before,
                    &st.mem,
                    message.gpa,
                    message.len,
                ))
                .into_owned();
                match r {
                    Err(RunError::Guest(GuestError::OutOfMemory(m)))
                        if kind == vmm_abi::PANIC_OUT_OF_MEMORY =>
                    {
                        assert_eq!(*m, want)
                    }
                    Err(RunError::Guest(GuestError::Panic(m)))
                        if kind != vmm_abi::PANIC_OUT_OF_MEMORY =>
                    {
                        assert_eq!(*m, want)
                    }
                    other => panic!("panic: {other:?}"),
                }
            }
            (Ok(Request::Error { code, message }), r) => {
                let want = String::from_utf8_lossy(&before_or_mem(
                    &before,
                    &st.mem,
                    message.gpa,
                    message.len,
                ))
                .into_owned();
                match r {
                    Err(RunError::Guest(GuestError::ModuleInvalid(m)))
                        if code == vmm_abi::ERR_MODULE_INVALID =>
                    {
                        assert_eq!(*m, want)
                    }
                    Err(RunError::Guest(GuestError::Runtime(m)))
                        if code != vmm_abi::ERR_MODULE_INVALID =>
                    {
                        assert_eq!(*m, want)
                    }
                    other => panic!("error: {other:?}"),
                }
            }
            (Ok(Request::Grant { range }), r) => {
                assert_eq!(*r.as_ref().unwrap(), Next::Resume);
                completed = true;
                map_may_change = true;
                assert!(
                    covered(&st.grants, range.gpa, range.len),
                    "grant {range:?} not covered"
                );
            }
        }
    }
    if !matches!(r, Ok(_)) || unknown_port {
        // Nothing written on an error.
        assert!(before == after, "guest RAM changed by a refused hostcall");
    }
    // Every changed byte of the window is one the hostcall answers with.
    if let Some((gpa, bytes)) = &buffer {
        let now = st.mem.read_vec(*gpa, bytes.len() as u64).unwrap();
        if now != *bytes {
            for (i, (b, n)) in bytes.iter().zip(&now).enumerate() {
                let at = gpa + i as u64;
                assert!(
                    b == n || (completed && completion_bytes(at)),
                    "buffer byte at {at:#x}: {n:#x}, want {b:#x}"
                );
            }
        }
    }
    // (Compared in 64-byte chunks first: a byte loop over the window is most of the time.)
    for (c, (xs, ys)) in before.chunks(64).zip(after.chunks(64)).enumerate() {
        if xs == ys {
            continue;
        }
        for (i, (x, y)) in xs.iter().zip(ys).enumerate() {
            if x == y {
                continue;
            }
            let at = (c * 64 + i) as u64;
            let in_buffer = buffer
                .as_ref()
                .is_some_and(|(g, b)| at >= *g && at < g + b.len() as u64);
            assert!(
                in_buffer
                    || (completed && completion_bytes(at))
                    || (map_may_change && grant_map_byte(at)),
                "the VMM wrote guest RAM at {at:#x} ({x:#x} -> {y:#x})"
            );
        }
    }
    match r {
        Ok(Next::Resume) => true,
        Ok(Next::Stop(Hostcall::Exit { .. })) | Err(_) => false,
        Ok(Next::Stop(call)) => {
            *pending = Some(call);
            false
        }
    }
}

/// Guest bytes as they were before the hostcall (the window's part from the copy taken
/// then; the VMM writes nothing outside it but buffers, checked separately).
fn before_or_mem(before: &[u8], mem: &GuestMemory, gpa: u64, len: u64) -> Vec<u8> {
    let mut v = mem.read_vec(gpa, len).unwrap();
    let end = (gpa + len).min(WINDOW);
    if gpa < end {
        v[..(end - gpa) as usize].copy_from_slice(&before[gpa as usize..end as usize]);
    }
    v
}

fuzz_target!(|data: &[u8]| {
    let mut rd = Reader { b: data };
    let m = rd.u8();
    let regions = if m >= 0xf0 {
        160
    } else {
        1 + u64::from(m % 12)
    };
    let mem_size = regions * REGION;
    let flags = rd.u8();
    let limit = usize::from(rd.u16()) * 64;
    let function = (flags & FLAG_FUNCTION != 0).then(|| {
        let n = rd.u16();
        rd.bytes(n.into())
    });
    let stdin = (flags & FLAG_STDIN != 0).then(|| {
        let n = rd.u16();
        rd.bytes(n.into())
    });
    let mem = GuestMemory::new(mem_size as usize).expect("guest RAM");
    // 4 KiB pages: a 2 MiB zero fill per input would be most of the time spent.
    mem.advise_small_pages(0, mem_size);
    let mut grants = if flags & FLAG_FIXED != 0 {
        Grants::fixed(mem_size)
    } else {
        Grants::none(mem_size)
    };
    if flags & FLAG_MAP != 0 {
        let n = rd.u8();
        let map = rd.bytes(n.into());
        if let Err(e) = grants.add_map(map) {
            assert!(e.contains("past guest RAM"), "{e}");
        }
    }
    let mut st = State {
        mem,
        grants,
        slots: Slots {
            mem_size,
            slots: Vec::new(),
        },
        out: Output::new(limit),
        answers: Answers {
            function,
            stdin,
            stdin_pos: 0,
        },
        limit,
    };
    st.grants
        .register_slots(&mut st.slots, &st.mem)
        .expect("register");
    check_grants(&st.grants, &st.slots, &st.mem, true);

    let mut pending: Option<Hostcall> = None;
    let mut ops = 0;
    while !rd.done() && ops < 512 {
        ops += 1;
        let kind = rd.u8() % 6;
        if pending.is_some() && kind != ANSWER {
            // The guest waits in its pending call: a run answers it first.
            let go = step(&mut st, HOSTCALL_PORT, &[0], &mut pending);
            if !go {
                return;
            }
        }
        let go = match kind {
            POKE => {
                let off = u64::from(rd.u16()) % WINDOW;
                let n = rd.u8();
                let b = rd.bytes(n.into());
                let n = (b.len() as u64).min(WINDOW - off);
                st.mem.write(off, &b[..n as usize]).unwrap();
                true
            }
            CALL => {
                let op = rd.val(mem_size);
                let args: Vec<u64> = (0..6).map(|_| rd.val(mem_size)).collect();
                let p = rd.u8();
                let port = if p & 1 == 1 { rd.u16() } else { HOSTCALL_PORT };
                let value = [0u8; 4];
                let base = layout::MAILBOX_GPA;
                st.mem.write_u64(base + offsets::OP as u64, op).unwrap();
                for (i, a) in args.iter().enumerate() {
                    st.mem
                        .write_u64(base + (offsets::ARGS + i * 8) as u64, *a)
                        .unwrap();
                }
                step(
                    &mut st,
                    port,
                    &value[..1 + usize::from((p >> 1) & 3)],
                    &mut pending,
                )
            }
            GRANTS => {
                let (start, stride, count) = (rd.u8(), rd.u8(), rd.u8());
                let base = layout::MAILBOX_GPA;
                let mut go = true;
                for i in 0..u64::from(count) {
                    let r = u64::from(start) + i * (u64::from(stride) + 1);
                    st.mem
                        .write_u64(base + offsets::OP as u64, vmm_abi::Op::Grant as u64)
                        .unwrap();
                    st.mem
                        .write_u64(base + offsets::ARGS as u64, r * REGION)
                        .unwrap();
                    st.mem
                        .write_u64(base + offsets::ARGS as u64 + 8, REGION)
                        .unwrap();
                    if !step(&mut st, HOSTCALL_PORT, &[0], &mut pending) {
                        go = false;
                        break;
                    }
                }
                go
            }
            MAILBOX => {
                let n = rd.u8();
                let b = rd.bytes(n.into());
                st.mem
                    .write(layout::MAILBOX_GPA, &b[..b.len().min(MAILBOX_BYTES)])
                    .unwrap();
                step(&mut st, HOSTCALL_PORT, &[0], &mut pending)
            }
            ANSWER => {
                let n = rd.u16();
                // A new invocation: its body.
                st.answers = Answers {
                    function: st.answers.function,
                    stdin: Some(rd.bytes(n.into())),
                    stdin_pos: 0,
                };
                if pending.is_some() {
                    step(&mut st, HOSTCALL_PORT, &[0], &mut pending)
                } else {
                    true
                }
            }
            _ => {
                st.out = Output::new(limit);
                true
            }
        };
        if !go {
            break;
        }
    }
});
