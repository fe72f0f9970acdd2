//! Spawned `vmm` processes: run this binary, time it, read what it reports with `--json`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;
use vmm::stats::ms;

/// The part of what `vmm run --json` and `vmm restore --json` print that the bench reads.
#[derive(Debug, serde::Deserialize)]
pub(super) struct InvocationJson {
    pub(super) stats: StatsJson,
}

/// `stats` of one invocation (`run::Stats`): the fields the bench uses.
#[derive(Debug, serde::Deserialize)]
pub(super) struct StatsJson {
    /// From `main` to the response.
    pub(super) total_ms: f64,
    /// The function's own run in the guest.
    pub(super) function_ms: f64,
    pub(super) exits: u64,
    /// Present for restores only.
    #[serde(default)]
    pub(super) restore: Option<RestoreStatsJson>,
}

/// `stats.restore` of one invocation (`snapshot::RestoreStats`): the fields the bench uses.
#[derive(Debug, serde::Deserialize)]
pub(super) struct RestoreStatsJson {
    /// How guest memory was filled (`--memory`'s name for it).
    #[serde(default)]
    pub(super) strategy: Option<String>,
    pub(super) pages_installed: u64,
    pub(super) uffd_faults: u64,
    pub(super) bytes_from_store: u64,
}

/// One `vmm` process: its wall time and what it printed on stdout.
pub(super) struct Invocation {
    pub(super) ms: f64,
    pub(super) stdout: Vec<u8>,
}

/// One `vmm ... --json` process: its wall time and the stats it reported.
pub(super) struct Timed {
    pub(super) ms: f64,
    pub(super) stats: StatsJson,
}

pub(super) fn exe() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| "vmm".into())
}

pub(super) fn invoke(args: &[String], input: &[u8]) -> Result<Invocation, String> {
    invoke_with_env(args, input, &[])
}

/// Run this binary with `args` (and `env` added), `input` on stdin; fails unless it exits 0.
pub(super) fn invoke_with_env(
    args: &[String],
    input: &[u8],
    env: &[(&str, &str)],
) -> Result<Invocation, String> {
    use std::io::Write;
    let t0 = Instant::now();
    let mut child = Command::new(exe())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn vmm: {e}"))?;
    if let Some(mut s) = child.stdin.take() {
        let _ = s.write_all(input);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("wait for vmm: {e}"))?;
    let elapsed = ms(t0.elapsed());
    if !out.status.success() {
        return Err(format!(
            "vmm {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(Invocation {
        ms: elapsed,
        stdout: out.stdout,
    })
}

/// Run `vmm run --json ...` or `vmm restore --json ...` (`args`) and read the stats it reports.
pub(super) fn invoke_json(
    args: &[String],
    input: &[u8],
    env: &[(&str, &str)],
) -> Result<Timed, String> {
    let inv = invoke_with_env(args, input, env)?;
    let stats = parse_stats(args, &inv.stdout)?;
    Ok(Timed { ms: inv.ms, stats })
}

/// The stats in what `vmm <args>` printed with `--json`.
pub(super) fn parse_stats(args: &[String], stdout: &[u8]) -> Result<StatsJson, String> {
    serde_json::from_slice::<InvocationJson>(stdout)
        .map(|r| r.stats)
        .map_err(|e| format!("read the JSON report of `vmm {}`: {e}", args.join(" ")))
}

pub(super) fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `vmm template create NAME --store STORE FUNCTION_ARGS`.
pub(super) fn create_template(
    name: &str,
    store: &Path,
    function_args: &[String],
) -> Result<(), String> {
    let mut args = vec![
        "template".into(),
        "create".into(),
        name.to_string(),
        "--json".into(),
        "--store".into(),
        s(store),
    ];
    args.extend_from_slice(function_args);
    invoke(&args, b"").map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::instance::Backing;

    fn args(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    /// What `vmm run --json` / `vmm restore --json` print (`cli::finish`), around real `Stats`.
    fn printed(stats: &vmm::stats::Stats) -> Vec<u8> {
        serde_json::json!({
            "status": 0,
            "reason": "exit",
            "exit_code": 0,
            "error": null,
            "stdout": "{}",
            "stderr": "",
            "stdout_truncated": false,
            "stderr_truncated": false,
            "stats": stats,
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn reads_the_stats_that_run_and_restore_print() {
        let mut stats = vmm::stats::Stats {
            mode: "cold",
            total_ms: 12.5,
            function_ms: 3.25,
            exits: 7,
            ..Default::default()
        };
        let cold = parse_stats(&args("run --json"), &printed(&stats)).unwrap();
        assert_eq!(
            (cold.total_ms, cold.function_ms, cold.exits),
            (12.5, 3.25, 7)
        );
        assert!(cold.restore.is_none());

        stats.restore = Some(vmm::stats::RestoreStats {
            strategy: Some(Backing::Lazy.name()),
            pages_installed: 11,
            uffd_faults: 13,
            bytes_from_store: 17 * 4096,
            ..Default::default()
        });
        let restored = parse_stats(&args("restore hello --json"), &printed(&stats)).unwrap();
        let r = restored.restore.unwrap();
        assert_eq!(
            (r.pages_installed, r.uffd_faults, r.bytes_from_store),
            (11, 13, 17 * 4096)
        );
        assert_eq!(r.strategy.as_deref(), Some("lazy"));
    }

    #[test]
    fn an_unreadable_report_is_an_error_naming_the_command() {
        for stdout in [
            &b"Hello, bench!"[..],
            b"",
            // What a failure before any run prints: no stats.
            br#"{"status":1,"reason":"vmm_error","exit_code":null,"error":"x"}"#,
            br#"{"stats":{"total_ms":"fast","function_ms":1.0,"exits":1}}"#,
        ] {
            let e = parse_stats(&args("restore hello --json"), stdout).unwrap_err();
            assert!(
                e.contains("JSON report of `vmm restore hello --json`"),
                "{e}"
            );
        }
    }
}
