//! The engines' glue: every `wasi_snapshot_preview1` function, listed once in
//! [`define_wasi!`](crate::define_wasi) and defined by each engine (`crate::engine`) on
//! its own linker over [`StoreData`].
//!
//! Each host function fetches the instance's `memory` (cached in [`StoreData::memory`]
//! once the instance exists) and calls the slice-based logic in [`WasiCtx`]. Functions
//! this runtime does not implement are still defined with their exact signatures and
//! return `ENOSYS` (`EROFS` for path mutations), so modules importing them instantiate.

use super::{Errno, WasiCtx};

pub const WASI_MODULE: &str = "wasi_snapshot_preview1";
pub const TEST_MODULE: &str = "vmm_test";

/// Every `wasi_snapshot_preview1` function (all are defined by [`add_to_linker`]).
pub const WASI_FUNCTIONS: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "fd_advise",
    "fd_allocate",
    "fd_close",
    "fd_datasync",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_fdstat_set_rights",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_pread",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_pwrite",
    "fd_read",
    "fd_readdir",
    "fd_renumber",
    "fd_seek",
    "fd_sync",
    "fd_tell",
    "fd_write",
    "path_create_directory",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_link",
    "path_open",
    "path_readlink",
    "path_remove_directory",
    "path_rename",
    "path_symlink",
    "path_unlink_file",
    "poll_oneoff",
    "proc_exit",
    "proc_raise",
    "sched_yield",
    "random_get",
    "sock_accept",
    "sock_recv",
    "sock_send",
    "sock_shutdown",
];

/// Does the linker built by [`add_to_linker`] define `module.name`?
pub fn provides(module: &str, name: &str, test_hostcalls: bool) -> bool {
    (module == WASI_MODULE && WASI_FUNCTIONS.contains(&name))
        || (test_hostcalls && module == TEST_MODULE && name == "hostcall")
}

/// An engine's store data: the WASI state, the host, and the instance's memory (`M`, the
/// engine's memory handle).
pub struct StoreData<H, M> {
    pub wasi: WasiCtx,
    pub host: H,
    /// The instance's `memory` export, set by the engine after instantiation.
    pub memory: Option<M>,
}

impl<H, M> StoreData<H, M> {
    pub fn new(host: H) -> Self {
        StoreData {
            wasi: WasiCtx::new(),
            host,
            memory: None,
        }
    }
}

/// A WASI result as the i32 errno wasm receives.
#[inline]
pub fn ret(r: Result<(), Errno>) -> i32 {
    match r {
        Ok(()) => super::errno::SUCCESS as i32,
        Err(e) => e as i32,
    }
}

/// Define every WASI preview1 function (and `vmm_test.hostcall` if `$test`) on `$linker`,
/// an engine's linker over [`StoreData`]. The invoking module provides, for its engine:
///
/// * `C<'a, H>`: its `Caller` type over `StoreData<H, _>`;
/// * `with_mem(&mut C, |wasi, host, mem| -> Result<(), Errno>) -> Result<i32, E>`: run the
///   logic over the caller's linear memory (an error if the module exports none);
/// * `proc_exit(code) -> Result<(), E>`: the error that ends the run with `code`;
/// * `H`: the host type parameter of the enclosing function.
///
/// `$linker.func_wrap(module, name, closure)` must return a `Result` that `?` converts to
/// the enclosing function's error.
#[macro_export]
macro_rules! define_wasi {
    ($linker:expr, $test:expr) => {{
        use $crate::wasi::errno;
        use $crate::wasi::link::{ret, TEST_MODULE, WASI_MODULE as W};
        let linker = $linker;

        // --- args / environ ---
        linker.func_wrap(W, "args_get", |mut c: C<'_, H>, a: i32, b: i32| {
            with_mem(&mut c, |w, _, m| w.args_get(m, a as u32, b as u32))
        })?;
        linker.func_wrap(W, "args_sizes_get", |mut c: C<'_, H>, a: i32, b: i32| {
            with_mem(&mut c, |w, _, m| w.args_sizes_get(m, a as u32, b as u32))
        })?;
        linker.func_wrap(W, "environ_get", |mut c: C<'_, H>, a: i32, b: i32| {
            with_mem(&mut c, |w, _, m| w.environ_get(m, a as u32, b as u32))
        })?;
        linker.func_wrap(W, "environ_sizes_get", |mut c: C<'_, H>, a: i32, b: i32| {
            with_mem(&mut c, |w, _, m| w.environ_sizes_get(m, a as u32, b as u32))
        })?;

        // --- clocks / random / sched / proc ---
        linker.func_wrap(W, "clock_res_get", |mut c: C<'_, H>, id: i32, out: i32| {
            with_mem(&mut c, |w, _, m| w.clock_res_get(m, id as u32, out as u32))
        })?;
        linker.func_wrap(
            W,
            "clock_time_get",
            |mut c: C<'_, H>, id: i32, prec: i64, out: i32| {
                with_mem(&mut c, |w, h, m| {
                    w.clock_time_get(h, m, id as u32, prec as u64, out as u32)
                })
            },
        )?;
        linker.func_wrap(W, "random_get", |mut c: C<'_, H>, buf: i32, len: i32| {
            with_mem(&mut c, |w, h, m| w.random_get(h, m, buf as u32, len as u32))
        })?;
        linker.func_wrap(W, "sched_yield", |_: C<'_, H>| -> i32 { 0 })?;
        linker.func_wrap(W, "proc_exit", |_: C<'_, H>, code: i32| proc_exit(code))?;
        linker.func_wrap(W, "proc_raise", |_: C<'_, H>, _sig: i32| -> i32 {
            errno::NOSYS as i32
        })?;
        linker.func_wrap(
            W,
            "poll_oneoff",
            |mut c: C<'_, H>, subs: i32, evs: i32, n: i32, nev: i32| {
                with_mem(&mut c, |w, h, m| {
                    w.poll_oneoff(h, m, subs as u32, evs as u32, n as u32, nev as u32)
                })
            },
        )?;

        // --- fds ---
        linker.func_wrap(
            W,
            "fd_read",
            |mut c: C<'_, H>, fd: i32, iovs: i32, n: i32, out: i32| {
                with_mem(&mut c, |w, h, m| {
                    w.fd_read(h, m, fd as u32, iovs as u32, n as u32, out as u32)
                })
            },
        )?;
        linker.func_wrap(
            W,
            "fd_pread",
            |mut c: C<'_, H>, fd: i32, iovs: i32, n: i32, off: i64, out: i32| {
                with_mem(&mut c, |w, h, m| {
                    w.fd_pread(
                        h,
                        m,
                        fd as u32,
                        iovs as u32,
                        n as u32,
                        off as u64,
                        out as u32,
                    )
                })
            },
        )?;
        linker.func_wrap(
            W,
            "fd_write",
            |mut c: C<'_, H>, fd: i32, iovs: i32, n: i32, out: i32| {
                with_mem(&mut c, |w, h, m| {
                    w.fd_write(h, m, fd as u32, iovs as u32, n as u32, out as u32)
                })
            },
        )?;
        linker.func_wrap(
            W,
            "fd_pwrite",
            |mut c: C<'_, H>, fd: i32, _iovs: i32, _n: i32, _off: i64, _out: i32| {
                with_mem(&mut c, |w, _, _| w.fd_pwrite(fd as u32))
            },
        )?;
        linker.func_wrap(W, "fd_close", |mut c: C<'_, H>, fd: i32| -> i32 {
            ret(c.data_mut().wasi.fd_close(fd as u32))
        })?;
        linker.func_wrap(
            W,
            "fd_seek",
            |mut c: C<'_, H>, fd: i32, off: i64, wh: i32, out: i32| {
                with_mem(&mut c, |w, _, m| {
                    let wh = u8::try_from(wh).map_err(|_| errno::INVAL)?;
                    w.fd_seek(m, fd as u32, off, wh, out as u32)
                })
            },
        )?;
        linker.func_wrap(W, "fd_tell", |mut c: C<'_, H>, fd: i32, out: i32| {
            with_mem(&mut c, |w, _, m| w.fd_tell(m, fd as u32, out as u32))
        })?;
        linker.func_wrap(W, "fd_fdstat_get", |mut c: C<'_, H>, fd: i32, out: i32| {
            with_mem(&mut c, |w, _, m| w.fd_fdstat_get(m, fd as u32, out as u32))
        })?;
        linker.func_wrap(
            W,
            "fd_fdstat_set_flags",
            |mut c: C<'_, H>, fd: i32, flags: i32| -> i32 {
                ret(c
                    .data_mut()
                    .wasi
                    .fd_fdstat_set_flags(fd as u32, flags as u16))
            },
        )?;
        linker.func_wrap(
            W,
            "fd_fdstat_set_rights",
            |mut c: C<'_, H>, fd: i32, _b: i64, _i: i64| -> i32 {
                ret(c
                    .data_mut()
                    .wasi
                    .fd_check(fd as u32)
                    .and(Err(errno::NOTSUP)))
            },
        )?;
        linker.func_wrap(W, "fd_prestat_get", |mut c: C<'_, H>, fd: i32, out: i32| {
            with_mem(&mut c, |w, _, m| w.fd_prestat_get(m, fd as u32, out as u32))
        })?;
        linker.func_wrap(
            W,
            "fd_prestat_dir_name",
            |mut c: C<'_, H>, fd: i32, p: i32, l: i32| {
                with_mem(&mut c, |w, _, m| {
                    w.fd_prestat_dir_name(m, fd as u32, p as u32, l as u32)
                })
            },
        )?;
        linker.func_wrap(
            W,
            "fd_filestat_get",
            |mut c: C<'_, H>, fd: i32, out: i32| {
                with_mem(&mut c, |w, _, m| {
                    w.fd_filestat_get(m, fd as u32, out as u32)
                })
            },
        )?;
        linker.func_wrap(
            W,
            "fd_filestat_set_size",
            |mut c: C<'_, H>, fd: i32, _size: i64| -> i32 {
                ret(c.data_mut().wasi.fd_check(fd as u32).and(Err(errno::ROFS)))
            },
        )?;
        linker.func_wrap(
            W,
            "fd_filestat_set_times",
            |mut c: C<'_, H>, fd: i32, _a: i64, _m: i64, _f: i32| -> i32 {
                ret(c.data_mut().wasi.fd_check(fd as u32).and(Err(errno::ROFS)))
            },
        )?;
        linker.func_wrap(
            W,
            "fd_readdir",
            |mut c: C<'_, H>, fd: i32, buf: i32, len: i32, cookie: i64, out: i32| {
                with_mem(&mut c, |w, _, m| {
                    w.fd_readdir(
                        m,
                        fd as u32,
                        buf as u32,
                        len as u32,
                        cookie as u64,
                        out as u32,
                    )
                })
            },
        )?;
        linker.func_wrap(
            W,
            "fd_renumber",
            |mut c: C<'_, H>, fd: i32, to: i32| -> i32 {
                ret(c.data_mut().wasi.fd_renumber(fd as u32, to as u32))
            },
        )?;
        linker.func_wrap(
            W,
            "fd_advise",
            |mut c: C<'_, H>, fd: i32, _o: i64, _l: i64, _a: i32| -> i32 {
                ret(c.data_mut().wasi.fd_check(fd as u32))
            },
        )?;
        linker.func_wrap(
            W,
            "fd_allocate",
            |mut c: C<'_, H>, fd: i32, _o: i64, _l: i64| -> i32 {
                ret(c.data_mut().wasi.fd_check(fd as u32).and(Err(errno::ROFS)))
            },
        )?;
        linker.func_wrap(W, "fd_datasync", |mut c: C<'_, H>, fd: i32| -> i32 {
            ret(c.data_mut().wasi.fd_check(fd as u32))
        })?;
        linker.func_wrap(W, "fd_sync", |mut c: C<'_, H>, fd: i32| -> i32 {
            ret(c.data_mut().wasi.fd_check(fd as u32))
        })?;

        // --- paths ---
        linker.func_wrap(
            W,
            "path_open",
            |mut c: C<'_, H>,
             fd: i32,
             dirflags: i32,
             p: i32,
             l: i32,
             oflags: i32,
             base: i64,
             inh: i64,
             fdflags: i32,
             out: i32| {
                with_mem(&mut c, |w, _, m| {
                    w.path_open(
                        m,
                        fd as u32,
                        dirflags as u32,
                        p as u32,
                        l as u32,
                        oflags as u16,
                        base as u64,
                        inh as u64,
                        fdflags as u16,
                        out as u32,
                    )
                })
            },
        )?;
        linker.func_wrap(
            W,
            "path_filestat_get",
            |mut c: C<'_, H>, fd: i32, flags: i32, p: i32, l: i32, out: i32| {
                with_mem(&mut c, |w, _, m| {
                    w.path_filestat_get(m, fd as u32, flags as u32, p as u32, l as u32, out as u32)
                })
            },
        )?;
        linker.func_wrap(
            W,
            "path_readlink",
            |mut c: C<'_, H>, fd: i32, p: i32, l: i32, _buf: i32, _len: i32, _out: i32| {
                with_mem(&mut c, |w, _, m| {
                    w.path_readlink(m, fd as u32, p as u32, l as u32)
                })
            },
        )?;
        linker.func_wrap(
            W,
            "path_create_directory",
            |mut c: C<'_, H>, fd: i32, _p: i32, _l: i32| -> i32 {
                ret(c.data_mut().wasi.path_mutation(fd as u32))
            },
        )?;
        linker.func_wrap(
            W,
            "path_remove_directory",
            |mut c: C<'_, H>, fd: i32, _p: i32, _l: i32| -> i32 {
                ret(c.data_mut().wasi.path_mutation(fd as u32))
            },
        )?;
        linker.func_wrap(
            W,
            "path_unlink_file",
            |mut c: C<'_, H>, fd: i32, _p: i32, _l: i32| -> i32 {
                ret(c.data_mut().wasi.path_mutation(fd as u32))
            },
        )?;
        linker.func_wrap(
            W,
            "path_filestat_set_times",
            |mut c: C<'_, H>,
             fd: i32,
             _fl: i32,
             _p: i32,
             _l: i32,
             _a: i64,
             _m: i64,
             _f: i32|
             -> i32 { ret(c.data_mut().wasi.path_mutation(fd as u32)) },
        )?;
        linker.func_wrap(
            W,
            "path_link",
            |mut c: C<'_, H>,
             fd: i32,
             _fl: i32,
             _p: i32,
             _l: i32,
             _nfd: i32,
             _np: i32,
             _nl: i32|
             -> i32 { ret(c.data_mut().wasi.path_mutation(fd as u32)) },
        )?;
        linker.func_wrap(
            W,
            "path_rename",
            |mut c: C<'_, H>, fd: i32, _p: i32, _l: i32, _nfd: i32, _np: i32, _nl: i32| -> i32 {
                ret(c.data_mut().wasi.path_mutation(fd as u32))
            },
        )?;
        linker.func_wrap(
            W,
            "path_symlink",
            |mut c: C<'_, H>, _op: i32, _ol: i32, fd: i32, _np: i32, _nl: i32| -> i32 {
                ret(c.data_mut().wasi.path_mutation(fd as u32))
            },
        )?;

        // --- sockets: none ---
        linker.func_wrap(
            W,
            "sock_accept",
            |_: C<'_, H>, _fd: i32, _fl: i32, _out: i32| -> i32 { errno::NOSYS as i32 },
        )?;
        linker.func_wrap(
            W,
            "sock_recv",
            |_: C<'_, H>, _fd: i32, _d: i32, _l: i32, _f: i32, _o1: i32, _o2: i32| -> i32 {
                errno::NOSYS as i32
            },
        )?;
        linker.func_wrap(
            W,
            "sock_send",
            |_: C<'_, H>, _fd: i32, _d: i32, _l: i32, _f: i32, _o: i32| -> i32 {
                errno::NOSYS as i32
            },
        )?;
        linker.func_wrap(
            W,
            "sock_shutdown",
            |_: C<'_, H>, _fd: i32, _how: i32| -> i32 { errno::NOSYS as i32 },
        )?;

        if $test {
            linker.func_wrap(
                TEST_MODULE,
                "hostcall",
                |mut c: C<'_, H>, op: i64, a0: i64, a1: i64, a2: i64, a3: i64| -> i64 {
                    let args = [a0 as u64, a1 as u64, a2 as u64, a3 as u64];
                    match c.data_mut().host.raw_hostcall(op as u64, args) {
                        Some(v) => v as i64,
                        None => -1,
                    }
                },
            )?;
        }
    }};
}
