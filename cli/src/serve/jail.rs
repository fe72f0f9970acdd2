//! `vmm serve --user USER [--jail DIR]`: the daemon started as root opens what it needs
//! (the listener, the auth file, the runtime modules, the store), then jails itself
//! before it starts a thread, a VM or a worker process:
//!
//! - a mount namespace of its own whose root (`pivot_root`) is a small read-only tmpfs
//!   holding only the store (bound read-write at its own path, `nosuid,nodev`), a `/dev`
//!   of `kvm` and `userfaultfd` (device nodes made for USER, as Firecracker's jailer makes
//!   them) and `null`, `zero`, `random`, `urandom`, a `/proc` that shows only the
//!   processes it may see (`hidepid=invisible,subset=pid`), the ELF interpreter and the
//!   shared libraries the binary has mapped (read-only, at their own paths: the workers'
//!   exec needs them), and with `--remote` what its S3 client reads (name resolution's
//!   files in /etc, the CA certificates); everything else of the host is out of reach;
//! - rlimits: open files sized for `--max-instances` (as [`super::limits`] computes),
//!   no core files (they would hold functions' memory), a bound on processes;
//! - `PR_SET_NO_NEW_PRIVS`, an empty capability bounding set and ambient set, no
//!   supplementary groups, USER's gid and uid (real, effective, saved), and no
//!   capabilities left in any set; all of it checked before it serves.
//!
//! Worker processes (`vmm serve-cell`) are started by the jailed daemon through
//! `/proc/self/exe` (a link to the binary, which is not itself in the jail), so they are
//! born jailed: same namespace, same user, no capabilities, no_new_privs.
//!
//! Userfaultfd keeps working: `vm.unprivileged_userfaultfd=0` refuses the system call to
//! a process without CAP_SYS_PTRACE unless it asks for user-mode faults only, which would
//! not serve the faults KVM takes from the kernel; so the jail's `/dev/userfaultfd`
//! (Linux 6.1+) belongs to USER, and the uffd crate opens it before the system call.
//! `vmm serve`'s instances never use it (their memory is `shared` or `copy`); a deploy's
//! template creation records its working set with it.
//!
//! The store must belong to USER (every file and directory in it): the daemon writes its
//! caches, deployed functions and templates there. [`prepare`] checks it before the daemon
//! writes anything and refuses with the `chown -R UID:GID STORE` to run; a store that does
//! not exist is made for USER. What the daemon then writes there as root before the drop
//! (the store's configuration and lock, `--runtime-module` blobs) is given to USER.

use std::ffi::CString;
use std::io::Read as _;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Who the daemon becomes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct User {
    pub(super) name: String,
    pub(super) uid: u32,
    pub(super) gid: u32,
}

/// Largest /etc/passwd read.
const MAX_PASSWD: u64 = 16 << 20;

/// `--user`: a name in /etc/passwd, a uid in it, or `UID:GID`.
pub(super) fn resolve_user(spec: &str) -> Result<User, String> {
    let mut text = String::new();
    let read = snapshot_store::open_regular(Path::new("/etc/passwd"))
        .and_then(|f| f.take(MAX_PASSWD).read_to_string(&mut text));
    resolve_in(spec, read.ok().map(|_| text.as_str()))
}

/// [`resolve_user`] over the text of /etc/passwd (None: it could not be read).
fn resolve_in(spec: &str, passwd: Option<&str>) -> Result<User, String> {
    let checked = |u: User| {
        if u.uid == 0 || u.gid == 0 {
            Err(format!(
                "--user {spec}: that is uid {} gid {}; the daemon drops to an unprivileged user: name one (e.g. a dedicated `vmm` user, or nobody)",
                u.uid, u.gid
            ))
        } else {
            Ok(u)
        }
    };
    if let Some((u, g)) = spec.split_once(':') {
        return match (u.parse::<u32>(), g.parse::<u32>()) {
            (Ok(uid), Ok(gid)) if uid != u32::MAX && gid != u32::MAX => checked(User {
                name: spec.to_string(),
                uid,
                gid,
            }),
            _ => Err(format!(
                "--user {spec}: expected a user name, a uid, or UID:GID (numbers)"
            )),
        };
    }
    let numeric = spec.parse::<u32>().ok();
    let entries = passwd.into_iter().flat_map(str::lines).filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 {
            return None;
        }
        Some((f[0], f[2].parse::<u32>().ok()?, f[3].parse::<u32>().ok()?))
    });
    for (name, uid, gid) in entries {
        if name == spec || numeric == Some(uid) {
            return checked(User {
                name: name.to_string(),
                uid,
                gid,
            });
        }
    }
    Err(match passwd {
        None => format!("--user {spec}: /etc/passwd cannot be read; give UID:GID instead"),
        Some(_) => format!(
            "--user {spec}: no such user in /etc/passwd (create one: `useradd --system --no-create-home vmm`, or give UID:GID)"
        ),
    })
}

/// Before the daemon writes anything (`--user`): it must be root, and the store must be
/// the user's; a store that does not exist yet is made for the user. The store's
/// canonical path (the one the jail binds it at); Err: what to do.
pub(super) fn prepare(user: &User, store: &Path) -> Result<PathBuf, String> {
    let what = |e: String| format!("--user {}: {e}", user.name);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(what(
            "the daemon must start as root to jail itself and drop to that user (or run it without --user under a service manager that sets its user, e.g. tools/systemd/vmm-serve.service)".into(),
        ));
    }
    if std::fs::symlink_metadata(store).is_err() {
        std::fs::create_dir_all(store)
            .map_err(|e| what(format!("create the store {}: {e}", store.display())))?;
        std::os::unix::fs::chown(store, Some(user.uid), Some(user.gid)).map_err(|e| {
            what(format!(
                "give the store {} to the user: {e}",
                store.display()
            ))
        })?;
    }
    let store = &std::fs::canonicalize(store)
        .map_err(|e| what(format!("the store {}: {e}", store.display())))?;
    if !store.is_dir() {
        return Err(what(format!(
            "the store {} is not a directory",
            store.display()
        )));
    }
    match not_owned(store, user.uid) {
        Ok(None) => Ok(store.clone()),
        Ok(Some((p, owner))) => Err(what(format!(
            "the store {} must belong to uid {} (the daemon writes its caches and functions there), and {} belongs to uid {owner}: give it to the user with `chown -R {}:{} {}`",
            store.display(),
            user.uid,
            p.display(),
            user.uid,
            user.gid,
            store.display()
        ))),
        Err(e) => Err(what(format!("read the store {}: {e}", store.display()))),
    }
}

/// Give the user what the daemon wrote into the store as root since [`prepare`] found it
/// all the user's (the store's lock and configuration, `--runtime-module` blobs).
///
/// The store is the user's: whatever runs as the user may rename, swap and link in it
/// while this runs as root. So every entry is reached through descriptors opened without
/// following symlinks, changed through its own descriptor (never a path looked up again),
/// and only directories and regular files with no other hard link are given away (a link
/// to a file outside the store must never become the user's).
fn give_back(store: &Path, user: &User) -> Result<(), String> {
    let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    let mut todo: Vec<(OwnedFd, PathBuf)> = Vec::new();
    let top = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(store)
            .map_err(|e| io(store, e))?
    };
    todo.push((OwnedFd::from(top), store.to_path_buf()));
    let mut first = true;
    while let Some((dir, shown)) = todo.pop() {
        if std::mem::take(&mut first) {
            give(&dir, &shown, user)?;
        }
        let listing = std::fs::read_dir(fd_path(&dir)).map_err(|e| io(&shown, e))?;
        for e in listing {
            let e = e.map_err(|e| io(&shown, e))?;
            let at = shown.join(e.file_name());
            let name = CString::new(e.file_name().as_bytes())
                .map_err(|_| format!("{}: a name with a NUL byte", at.display()))?;
            // SAFETY: `dir` is an open descriptor and `name` a NUL-terminated string; the
            // result is checked and owned at once.
            let fd = unsafe {
                libc::openat(
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(io(&at, std::io::Error::last_os_error()));
            }
            // SAFETY: a fresh descriptor nothing else owns.
            let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let kind = give(&fd, &at, user)?;
            if kind == libc::S_IFDIR {
                // SAFETY: as above, relative to `dir`.
                let d = unsafe {
                    libc::openat(
                        dir.as_raw_fd(),
                        name.as_ptr(),
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    )
                };
                if d < 0 {
                    return Err(io(&at, std::io::Error::last_os_error()));
                }
                // SAFETY: a fresh descriptor nothing else owns.
                todo.push((
                    unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(d) },
                    at,
                ));
            }
        }
    }
    Ok(())
}

/// Give the entry open as `fd` to the user if it is a directory or a regular file of one
/// link and not already theirs; its file type.
fn give(fd: &OwnedFd, shown: &Path, user: &User) -> Result<libc::mode_t, String> {
    // SAFETY: an all-zero stat is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open; `st` is a live, writable stat.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(format!(
            "{}: {}",
            shown.display(),
            std::io::Error::last_os_error()
        ));
    }
    let kind = st.st_mode & libc::S_IFMT;
    if st.st_uid == user.uid && st.st_gid == user.gid {
        return Ok(kind);
    }
    match kind {
        libc::S_IFDIR => {}
        libc::S_IFREG if st.st_nlink == 1 => {}
        libc::S_IFREG => {
            return Err(format!(
                "{} is not the user's and has {} hard links: remove it from the store",
                shown.display(),
                st.st_nlink
            ))
        }
        // Symlinks and anything else: left alone (the store makes none).
        _ => return Ok(kind),
    }
    // SAFETY: fchownat on the descriptor itself (AT_EMPTY_PATH with an empty path).
    let r = unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            user.uid,
            user.gid,
            libc::AT_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(format!(
            "give {} to the user: {}",
            shown.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(kind)
}

/// What the jail is built from, decided by the daemon's start-up.
pub(super) struct Plan<'a> {
    pub(super) user: &'a User,
    pub(super) store: &'a Path,
    /// The directory the jail's tmpfs root is mounted on, in the daemon's own namespace.
    pub(super) dir: Option<&'a Path>,
    /// RLIMIT_NOFILE the daemon and its workers need (at least).
    pub(super) open_files: u64,
    /// Processes and threads the daemon and its workers run, for RLIMIT_NPROC.
    pub(super) tasks: u64,
    /// Files read-only in the jail at their own paths (name resolution for --remote).
    pub(super) files: Vec<PathBuf>,
}

/// Where the jail's root is mounted without `--jail` (in the daemon's namespace only: the
/// host's directory is hidden from the daemon, never changed).
const DEFAULT_MOUNT_POINT: &str = "/tmp";

fn os_error(step: &str) -> String {
    format!("{step}: {}", std::io::Error::last_os_error())
}

fn cstr(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| format!("{}: a path with a NUL byte", p.display()))
}

fn mount(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let src_c = src.map(cstr).transpose()?;
    let dst_c = cstr(dst)?;
    let fs_c = fstype.map(|f| CString::new(f).expect("no NUL"));
    let data_c = data.map(|d| CString::new(d).expect("no NUL"));
    let p = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let r = unsafe {
        libc::mount(
            p(&src_c),
            dst_c.as_ptr(),
            p(&fs_c),
            flags,
            p(&data_c).cast(),
        )
    };
    if r != 0 {
        return Err(os_error(&format!(
            "mount {} on {}",
            src.or(fstype.map(Path::new))
                .unwrap_or(Path::new("(none)"))
                .display(),
            dst.display()
        )));
    }
    Ok(())
}

/// An O_PATH descriptor of `p` (following symlinks), to bind it after mounts may have
/// hidden its path.
fn open_path(p: &Path) -> Result<OwnedFd, String> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(p)
        .map(OwnedFd::from)
        .map_err(|e| format!("open {}: {e}", p.display()))
}

fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// `root` + the absolute path `p`.
fn inside(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

fn mknod(path: &Path, mode: u32, rdev: u64, owner: Option<(u32, u32)>) -> Result<(), String> {
    let c = cstr(path)?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | mode, rdev) } != 0 {
        return Err(os_error(&format!(
            "make the device node {}",
            path.display()
        )));
    }
    // mknod applies the umask; the mode is set exactly.
    // SAFETY: as above.
    if unsafe { libc::chmod(c.as_ptr(), mode) } != 0 {
        return Err(os_error(&format!("chmod {}", path.display())));
    }
    if let Some((uid, gid)) = owner {
        // SAFETY: as above.
        if unsafe { libc::chown(c.as_ptr(), uid, gid) } != 0 {
            return Err(os_error(&format!("chown {}", path.display())));
        }
    }
    Ok(())
}

/// The first entry of the store (itself included) that is not `uid`'s, if any.
fn not_owned(store: &Path, uid: u32) -> std::io::Result<Option<(PathBuf, u32)>> {
    let mut todo = vec![store.to_path_buf()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p)?;
        if m.uid() != uid && !m.file_type().is_symlink() {
            return Ok(Some((p, m.uid())));
        }
        if m.is_dir() {
            for e in std::fs::read_dir(&p)? {
                todo.push(e?.path());
            }
        }
    }
    Ok(None)
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

fn capget() -> Result<[CapData; 2], String> {
    let mut h = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut d = [CapData::default(); 2];
    // SAFETY: capget with version 3 writes two CapData (the kernel's layout) into `d`.
    if unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) } != 0 {
        return Err(os_error("capget"));
    }
    Ok(d)
}

fn set_rlimit(what: libc::__rlimit_resource_t, name: &str, v: u64) -> Result<(), String> {
    let r = libc::rlimit {
        rlim_cur: v,
        rlim_max: v,
    };
    // SAFETY: setrlimit reads one rlimit from `r`, which lives for the call.
    if unsafe { libc::setrlimit(what, &r) } != 0 {
        return Err(os_error(&format!("set {name} to {v}")));
    }
    Ok(())
}

fn get_rlimit(what: libc::__rlimit_resource_t) -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `r`, which lives for the call.
    if unsafe { libc::getrlimit(what, &mut r) } != 0 {
        return (1024, 1024);
    }
    (r.rlim_cur, r.rlim_max)
}

/// Jail this process as [`Plan`] says (see the module's documentation). Must run before
/// any other thread exists: namespaces, no_new_privs and capabilities are per thread.
/// Err: the step that failed and what to do.
pub(super) fn enter(plan: &Plan) -> Result<(), String> {
    let user = plan.user;
    let what = |e: String| format!("--user {}: {e}", user.name);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(what(
            "the daemon must start as root to jail itself and drop to that user (or run it without --user under a service manager that sets its user, e.g. tools/systemd/vmm-serve.service)".into(),
        ));
    }
    let n = threads();
    if n != 1 {
        return Err(what(format!(
            "the jail must be entered while the daemon has one thread, and it has {n} (a bug: report it)"
        )));
    }
    give_back(plan.store, user).map_err(|e| {
        what(format!(
            "give the user what the daemon wrote into the store: {e}"
        ))
    })?;
    let last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
        .min(63);
    use std::os::unix::fs::FileTypeExt;
    let device = |p: &str, required: bool| -> Result<Option<u64>, String> {
        match std::fs::metadata(p) {
            Ok(m) if m.file_type().is_char_device() => Ok(Some(m.rdev())),
            Ok(_) => Err(what(format!("{p} is not a character device"))),
            Err(e) if required => Err(what(format!(
                "{p}: {e} (is KVM there? try `ls -l /dev/kvm`)"
            ))),
            Err(_) => Ok(None),
        }
    };
    let kvm = device("/dev/kvm", true)?.unwrap_or(0);
    let uffd = device("/dev/userfaultfd", false)?;
    let plain: Vec<(&str, u64)> = ["null", "zero", "random", "urandom"]
        .into_iter()
        .filter_map(|d| Some((d, device(&format!("/dev/{d}"), false).ok()??)))
        .collect();
    // The daemon's own /proc/self/pagemap, opened while its /proc file is still its own
    // (once it is not dumpable after the drop, /proc/self/pagemap belongs to root).
    let _ = vmm::memory::pagemap();
    let program = program_files();

    let root = plan.dir.unwrap_or(Path::new(DEFAULT_MOUNT_POINT));
    if let Some(d) = plan.dir {
        let m = std::fs::metadata(d).map_err(|e| what(format!("--jail {}: {e}", d.display())))?;
        if !d.is_absolute() || !m.is_dir() {
            return Err(what(format!(
                "--jail {}: must be an absolute path of a directory",
                d.display()
            )));
        }
    }

    // SAFETY: unshare has no memory arguments; this is the only thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(what(os_error("a mount namespace of its own (unshare)")));
    }
    let step = |r: Result<(), String>| r.map_err(|e| what(format!("build the jail: {e}")));
    // Nothing done here propagates back to the host.
    step(mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    ))?;
    // Everything the jail binds, opened in the new namespace (a
    // bind's source must be one of its mounts) before any mount may hide its path.
    let store_fd = open_path(plan.store).map_err(what)?;
    // (path in the jail, its file, whether it may be executed or mapped executable)
    let files: Vec<(PathBuf, OwnedFd, bool)> = plan
        .files
        .iter()
        .map(|p| (p, p, false))
        .chain(program.iter().map(|(at, from)| (at, from, true)))
        .filter_map(|(at, from, exec)| open_path(from).ok().map(|fd| (at.clone(), fd, exec)))
        .collect();
    if !root.is_dir() {
        return Err(what(format!(
            "build the jail: {} is not a directory to mount its root on; pass --jail DIR (any existing directory: it is covered only in the daemon's own mount namespace)",
            root.display()
        )));
    }
    step(mount(
        None,
        root,
        Some("tmpfs"),
        libc::MS_NOSUID,
        Some("mode=0755,size=1m,nr_inodes=4096"),
    ))?;
    let mkdirs = |p: &Path| -> Result<(), String> {
        std::fs::create_dir_all(p).map_err(|e| format!("mkdir {}: {e}", p.display()))
    };
    // The store, read-write, at its own path.
    let store_in = inside(root, plan.store);
    step(mkdirs(&store_in))?;
    step(mount(
        Some(&fd_path(&store_fd)),
        &store_in,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    ))?;
    step(mount(
        None,
        &store_in,
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    ))?;
    drop(store_fd);
    for (p, fd, exec) in &files {
        let at = inside(root, p);
        if let Some(parent) = at.parent() {
            step(mkdirs(parent))?;
        }
        // A file or a directory (with what is mounted under it), over one made here.
        if std::fs::metadata(fd_path(fd)).is_ok_and(|m| m.is_dir()) {
            step(mkdirs(&at))?;
        } else if !at.exists() {
            step(std::fs::write(&at, b"").map_err(|e| format!("create {}: {e}", at.display())))?;
        }
        step(mount(
            Some(&fd_path(fd)),
            &at,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        ))?;
        step(mount(
            None,
            &at,
            None,
            libc::MS_REMOUNT
                | libc::MS_BIND
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | if *exec { 0 } else { libc::MS_NOEXEC },
            None,
        ))?;
    }
    drop(files);
    // /dev: KVM and userfaultfd for the user alone, the usual pseudo-devices for all.
    let dev = root.join("dev");
    step(mkdirs(&dev))?;
    step(mknod(
        &dev.join("kvm"),
        0o600,
        kvm,
        Some((user.uid, user.gid)),
    ))?;
    if let Some(rdev) = uffd {
        step(mknod(
            &dev.join("userfaultfd"),
            0o600,
            rdev,
            Some((user.uid, user.gid)),
        ))?;
    }
    for (name, rdev) in plain {
        step(mknod(&dev.join(name), 0o666, rdev, None))?;
    }
    // /proc: this process's own files (statm, pagemap, exe for the workers); other
    // processes' only where it could ptrace them; none of /proc/sys and the like.
    let proc_dir = root.join("proc");
    step(mkdirs(&proc_dir))?;
    let proc_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    if mount(
        None,
        &proc_dir,
        Some("proc"),
        proc_flags,
        Some("hidepid=invisible,subset=pid"),
    )
    .is_err()
    {
        // Before Linux 5.8: no subset=pid.
        step(mount(
            None,
            &proc_dir,
            Some("proc"),
            proc_flags,
            Some("hidepid=2"),
        ))?;
    }
    // The switch: the tmpfs becomes /, the host's root is detached.
    let old = root.join(".old-root");
    step(mkdirs(&old))?;
    let (root_c, old_c) = (cstr(root).map_err(what)?, cstr(&old).map_err(what)?);
    // SAFETY: pivot_root takes two NUL-terminated paths that outlive the call.
    if unsafe { libc::syscall(libc::SYS_pivot_root, root_c.as_ptr(), old_c.as_ptr()) } != 0 {
        return Err(what(os_error("build the jail: pivot_root")));
    }
    std::env::set_current_dir("/").map_err(|e| what(format!("build the jail: chdir /: {e}")))?;
    let old_in = Path::new("/.old-root");
    let old_in_c = cstr(old_in).map_err(what)?;
    // SAFETY: a NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(old_in_c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(what(os_error("build the jail: detach the host's root")));
    }
    let _ = std::fs::remove_dir(old_in);
    step(mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID,
        None,
    ))?;

    // Limits, then the privileges.
    let open_files = plan.open_files.max(get_rlimit(libc::RLIMIT_NOFILE).0);
    set_rlimit(libc::RLIMIT_NOFILE, "the open-files limit", open_files).map_err(what)?;
    set_rlimit(libc::RLIMIT_CORE, "the core-file limit", 0).map_err(what)?;
    set_rlimit(libc::RLIMIT_NPROC, "the process limit", plan.tasks).map_err(what)?;
    // SAFETY: prctl with integer arguments only, here and below.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(what(os_error("set no_new_privs")));
    }
    for cap in 0..=last_cap {
        // SAFETY: as above.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            return Err(what(os_error(&format!(
                "drop capability {cap} from the bounding set"
            ))));
        }
    }
    // SAFETY: as above.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(what(os_error("clear the ambient capabilities")));
    }
    // SAFETY: setgroups reads 0 entries from a null pointer; glibc's setgroups, setresgid
    // and setresuid apply to every thread (there is one).
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(what(os_error("drop the supplementary groups")));
    }
    // SAFETY: integer arguments.
    if unsafe { libc::setresgid(user.gid, user.gid, user.gid) } != 0 {
        return Err(what(os_error(&format!("set gid {}", user.gid))));
    }
    // SAFETY: integer arguments.
    if unsafe { libc::setresuid(user.uid, user.uid, user.uid) } != 0 {
        return Err(what(os_error(&format!("set uid {}", user.uid))));
    }
    let mut h = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let none = [CapData::default(); 2];
    // SAFETY: capset with version 3 reads two CapData (the kernel's layout) from `none`.
    if unsafe { libc::syscall(libc::SYS_capset, &mut h, none.as_ptr()) } != 0 {
        return Err(what(os_error("clear the capabilities")));
    }
    verify(plan, last_cap).map_err(|e| what(format!("after dropping privileges: {e}")))?;
    tracing::info!(
        user = %user.name,
        uid = user.uid,
        gid = user.gid,
        store = %plan.store.display(),
        open_files,
        "jailed: own mount namespace (only the store, /dev/kvm and /proc visible), no capabilities, no_new_privs"
    );
    Ok(())
}

/// What [`enter`] must have achieved, read back from the kernel.
fn verify(plan: &Plan, last_cap: u32) -> Result<(), String> {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: getresuid/getresgid write three ids into live locals.
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    if [r, e, s] != [plan.user.uid; 3] {
        return Err(format!("uids are {r}/{e}/{s}"));
    }
    // SAFETY: as above.
    unsafe { libc::getresgid(&mut r, &mut e, &mut s) };
    if [r, e, s] != [plan.user.gid; 3] {
        return Err(format!("gids are {r}/{e}/{s}"));
    }
    // SAFETY: getgroups(0, NULL) only counts.
    let groups = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if groups != 0 {
        return Err(format!("{groups} supplementary groups left"));
    }
    let caps = capget()?;
    if caps != [CapData::default(); 2] {
        return Err(format!("capabilities left: {caps:?}"));
    }
    for cap in 0..=last_cap {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } != 0 {
            return Err(format!("capability {cap} is still in the bounding set"));
        }
        // SAFETY: as above.
        if unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_IS_SET, cap, 0, 0) } != 0
        {
            return Err(format!("capability {cap} is still ambient"));
        }
    }
    // SAFETY: as above.
    if unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) } != 1 {
        return Err("no_new_privs is not set".into());
    }
    // SAFETY: setuid(0) must fail now; if it did not, the process would be root again,
    // which the check reports.
    if unsafe { libc::setuid(0) } == 0 {
        return Err("setuid(0) succeeded".into());
    }
    let store = cstr(plan.store)?;
    // SAFETY: a NUL-terminated path that outlives the call.
    if unsafe { libc::access(store.as_ptr(), libc::R_OK | libc::W_OK | libc::X_OK) } != 0 {
        return Err(os_error(&format!(
            "the store {} is not readable and writable",
            plan.store.display()
        )));
    }
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    if let Err(e) = kvm {
        return Err(format!("the jail's /dev/kvm cannot be opened: {e}"));
    }
    Ok(())
}

/// The program's ELF interpreter (PT_INTERP of /proc/self/exe), if it has one.
fn interpreter() -> Option<PathBuf> {
    let mut head = Vec::new();
    std::fs::File::open("/proc/self/exe")
        .ok()?
        .take(1 << 20)
        .read_to_end(&mut head)
        .ok()?;
    let u16_at = |o: usize| Some(u16::from_le_bytes(head.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(head.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(head.get(o..o + 8)?.try_into().ok()?));
    // A little-endian ELF64.
    if head.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum.min(256) {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? == libc::PT_INTERP {
            let off = usize::try_from(u64_at(ph + 8)?).ok()?;
            let len = usize::try_from(u64_at(ph + 32)?).ok()?.min(4096);
            let raw = head.get(off..off.checked_add(len)?)?;
            let raw = raw.split(|&b| b == 0).next()?;
            let p = PathBuf::from(std::ffi::OsStr::from_bytes(raw));
            return p.is_absolute().then_some(p);
        }
    }
    None
}

/// What the worker processes' exec needs in the jail, as (path in the jail, file): the
/// ELF interpreter at the path the binary names, and every shared library this process
/// has mapped at its own path (the interpreter looks for them in the system directories,
/// where the kernel's names for them are).
fn program_files() -> Vec<(PathBuf, PathBuf)> {
    let mut out: Vec<(PathBuf, PathBuf)> = Vec::new();
    let exe = std::fs::read_link("/proc/self/exe").ok();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    for line in maps.lines() {
        // address perms offset dev inode path
        let Some(path) = line.split_whitespace().nth(5) else {
            continue;
        };
        let p = PathBuf::from(path);
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        let lib = name.is_some_and(|n| n.ends_with(".so") || n.contains(".so."));
        if p.is_absolute() && lib && Some(&p) != exe.as_ref() && !out.iter().any(|(a, _)| *a == p) {
            out.push((p.clone(), p));
        }
    }
    if let Some(i) = interpreter() {
        if !out.iter().any(|(a, _)| *a == i) {
            out.push((i.clone(), i));
        }
    }
    out
}

/// What the S3 client of `--remote` reads, those that exist: name resolution's files and
/// the CA certificates (the places OpenSSL's and rustls' probes look, and
/// `$SSL_CERT_FILE`/`$SSL_CERT_DIR`; Debian's bundle links into /usr/share).
pub(super) fn remote_files() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = [
        "/etc/resolv.conf",
        "/etc/hosts",
        "/etc/nsswitch.conf",
        "/etc/gai.conf",
        "/etc/ssl/certs",
        "/etc/ssl/cert.pem",
        "/etc/pki/tls/certs",
        "/etc/pki/ca-trust/extracted",
        "/etc/ca-certificates",
        "/usr/share/ca-certificates",
        "/usr/local/share/ca-certificates",
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect();
    for var in ["SSL_CERT_FILE", "SSL_CERT_DIR"] {
        if let Some(v) = std::env::var_os(var) {
            out.extend(std::env::split_paths(&v).filter(|p| p.is_absolute()));
        }
    }
    out.retain(|p| p.exists());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        daemon:x:1:1::/:/usr/sbin/nologin\n\
        broken line\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";

    #[test]
    fn users_are_resolved_by_name_uid_or_uid_gid_and_root_is_refused() {
        let nobody = User {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
        };
        assert_eq!(resolve_in("nobody", Some(PASSWD)), Ok(nobody.clone()));
        assert_eq!(resolve_in("65534", Some(PASSWD)), Ok(nobody));
        assert_eq!(
            resolve_in("1000:1001", None),
            Ok(User {
                name: "1000:1001".into(),
                uid: 1000,
                gid: 1001
            })
        );
        let e = resolve_in("root", Some(PASSWD)).unwrap_err();
        assert!(e.contains("unprivileged"), "{e}");
        assert!(resolve_in("0:5", None)
            .unwrap_err()
            .contains("unprivileged"));
        let e = resolve_in("vmm", Some(PASSWD)).unwrap_err();
        assert!(e.contains("no such user") && e.contains("useradd"), "{e}");
        let e = resolve_in("vmm", None).unwrap_err();
        assert!(e.contains("UID:GID"), "{e}");
        assert!(resolve_in("a:b", None).unwrap_err().contains("UID:GID"));
    }
}
