//! The host limits `--max-instances` runs into, checked at start-up (issue 19): every
//! instance holds file descriptors (its KVM VM and vCPU) and mappings (guest RAM, split
//! where regions are mapped from the template's image, and the vCPU's run page). Without
//! this check a daemon asked for 10,000 instances would fail at the few-thousandth one,
//! in the middle of serving; with it, it refuses to start and names the setting.

/// Descriptors an instance holds (measured: 2.0 per instance over 36 shared instances of
/// four templates; `/proc/self/pagemap` is one per process).
const FDS_PER_INSTANCE: u64 = 2;
/// Mappings an instance adds, at most (measured: 7.0 per instance over 36 shared instances
/// of JavaScript and Python templates; a template whose data regions alternate with
/// empty ones more often splits guest RAM into more pieces).
const MAPS_PER_INSTANCE: u64 = 16;
/// What the daemon needs beside its instances: connections, the store's packs and images,
/// the binary's own mappings. The default `--max-instances 256` stays within the common
/// open-files limit of 1024.
const FDS_RESERVE: u64 = 256;
const MAPS_RESERVE: u64 = 4096;

/// What the host allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Host {
    /// RLIMIT_NOFILE: soft and hard.
    pub(super) nofile: (u64, u64),
    /// vm.max_map_count.
    pub(super) max_map_count: u64,
}

impl Host {
    pub(super) fn read() -> Host {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into `r`, which lives for the call.
        let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0;
        let max_map_count = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(65530);
        Host {
            nofile: if ok {
                (r.rlim_cur, r.rlim_max)
            } else {
                (1024, 1024)
            },
            max_map_count,
        }
    }
}

/// The descriptors `max_instances` need, and whether the soft limit must be raised to get
/// them (None: it is enough already); Err: more than the hard limit allows, or more
/// mappings than `vm.max_map_count`: why, naming the setting to change.
pub(super) fn check(max_instances: u32, host: Host) -> Result<Option<u64>, String> {
    let n = u64::from(max_instances);
    let fds = open_files(max_instances);
    let maps = n * MAPS_PER_INSTANCE + MAPS_RESERVE;
    let mut problems = Vec::new();
    if maps > host.max_map_count {
        problems.push(format!(
            "up to {maps} memory mappings, and vm.max_map_count is {} (raise it: `sysctl -w vm.max_map_count={maps}`)",
            host.max_map_count
        ));
    }
    if fds > host.nofile.1 {
        problems.push(format!(
            "up to {fds} open files, and the hard limit (RLIMIT_NOFILE) is {} (raise it: `ulimit -Hn {fds}` as root, or LimitNOFILE={fds} in a systemd unit)",
            host.nofile.1
        ));
    }
    if !problems.is_empty() {
        return Err(format!(
            "--max-instances {max_instances} needs {}; or lower --max-instances",
            problems.join("; and ")
        ));
    }
    Ok((fds > host.nofile.0).then_some(fds))
}

/// The open files a process holding `max_instances` instances needs (RLIMIT_NOFILE).
pub(super) fn open_files(max_instances: u32) -> u64 {
    u64::from(max_instances) * FDS_PER_INSTANCE + FDS_RESERVE
}

/// Check the host's limits for `max_instances` and raise the soft RLIMIT_NOFILE as far as
/// they need (never past the hard limit). Err: what to change.
pub(super) fn ensure(max_instances: u32) -> Result<(), String> {
    let host = Host::read();
    let Some(fds) = check(max_instances, host)? else {
        return Ok(());
    };
    let r = libc::rlimit {
        rlim_cur: fds,
        rlim_max: host.nofile.1,
    };
    // SAFETY: setrlimit reads one rlimit from `r`; raising the soft limit up to the hard one
    // needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(format!(
            "raise the open-files limit to {fds} for --max-instances {max_instances}: {}",
            std::io::Error::last_os_error()
        ));
    }
    tracing::info!(
        open_files = fds,
        "raised the soft open-files limit for --max-instances {max_instances}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: Host = Host {
        nofile: (1024, 524288),
        max_map_count: 65530,
    };

    #[test]
    fn the_default_fits_a_default_host_and_big_pools_name_the_setting() {
        // --max-instances 256 (the default) fits the common 1024 open files.
        let small = Host {
            nofile: (1024, 1024),
            ..HOST
        };
        assert_eq!(check(256, small), Ok(None));
        // 2,000 need the soft limit raised (the hard one allows it).
        assert_eq!(check(2000, HOST), Ok(Some(2000 * 2 + 256)));
        // 10,000 instances: more mappings than 65,530.
        let e = check(10_000, HOST).unwrap_err();
        assert!(e.contains("vm.max_map_count=164096"), "{e}");
        assert!(!e.contains("RLIMIT_NOFILE"), "{e}");
        // A low hard limit is named too.
        let e = check(
            10_000,
            Host {
                nofile: (1024, 4096),
                max_map_count: 1 << 20,
            },
        )
        .unwrap_err();
        assert!(
            e.contains("RLIMIT_NOFILE) is 4096") && e.contains("ulimit -Hn 20256"),
            "{e}"
        );
        assert!(e.contains("lower --max-instances"), "{e}");
    }
}
