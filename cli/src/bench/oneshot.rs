//! Section `oneshot`: one request per process, as a user of the command line sees it. A
//! `vmm restore` of a template and a cold `vmm run` of the same function, interleaved, each
//! timed from spawning the process to the first byte of the response on its stdout, and to
//! the process being gone (reaped); beside them `vmm --version`, the floor of any process of
//! this binary on this machine.

use super::process::{create_template, exe, s};
use super::util::percentile;
use super::{BenchArgs, Function};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;
use vmm::stats::ms;

/// One command's figures, over `runs` processes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OneShotRow {
    pub function: &'static str,
    /// `restore`, `cold` or `version`.
    pub mode: &'static str,
    pub runs: u64,
    pub first_byte_median_ms: f64,
    pub first_byte_p90_ms: f64,
    pub gone_median_ms: f64,
    pub gone_p90_ms: f64,
}

/// Spawn this binary with `args`, `input` on stdin; the times from the spawn to the first
/// byte on its stdout and to its exit. Fails unless it exits 0 with a response.
fn timed(args: &[String], input: &[u8]) -> Result<(f64, f64), String> {
    let t0 = Instant::now();
    let mut child = Command::new(exe())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn vmm: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input);
    }
    let mut stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let mut first = [0u8; 1];
    let n = stdout
        .read(&mut first)
        .map_err(|e| format!("read vmm's stdout: {e}"))?;
    let first_byte = ms(t0.elapsed());
    let mut rest = Vec::new();
    let _ = stdout.read_to_end(&mut rest);
    let status = child.wait().map_err(|e| format!("wait for vmm: {e}"))?;
    let gone = ms(t0.elapsed());
    if n == 0 || !status.success() {
        return Err(format!("vmm {} failed ({status})", args.join(" ")));
    }
    Ok((first_byte, gone))
}

pub(super) fn oneshot(
    a: &BenchArgs,
    store: &Path,
    f: &Function,
) -> Result<Vec<OneShotRow>, String> {
    create_template(f.name, store, &f.args)?;
    let restore: Vec<String> = vec!["restore".into(), f.name.into(), "--store".into(), s(store)];
    let mut cold: Vec<String> = vec!["run".into(), "--store".into(), s(store)];
    cold.extend(f.args.iter().cloned());
    let version: Vec<String> = vec!["--version".into()];
    let runs = a.oneshot_runs;
    let (mut r, mut c, mut v) = (Vec::new(), Vec::new(), Vec::new());
    // One of each first, not counted: the page cache holds the binary and the store.
    timed(&restore, f.input)?;
    timed(&cold, f.input)?;
    for _ in 0..runs {
        r.push(timed(&restore, f.input)?);
        c.push(timed(&cold, f.input)?);
        v.push(timed(&version, b"")?);
    }
    let row = |mode, t: &[(f64, f64)]| {
        let first: Vec<f64> = t.iter().map(|x| x.0).collect();
        let gone: Vec<f64> = t.iter().map(|x| x.1).collect();
        OneShotRow {
            function: f.label,
            mode,
            runs,
            first_byte_median_ms: percentile(&first, 0.5),
            first_byte_p90_ms: percentile(&first, 0.9),
            gone_median_ms: percentile(&gone, 0.5),
            gone_p90_ms: percentile(&gone, 0.9),
        }
    };
    Ok(vec![
        row("restore", &r),
        row("cold", &c),
        row("version", &v),
    ])
}

pub(super) fn print_oneshot(rows: &[OneShotRow]) {
    println!("## One request per process: spawn to the response's first byte, and to exit\n");
    println!(
        "| function | command | runs | first byte median ms | p90 ms | gone median ms | p90 ms |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for r in rows {
        let cmd = match r.mode {
            "restore" => "`vmm restore`",
            "cold" => "`vmm run` (cold)",
            _ => "`vmm --version` (any process)",
        };
        println!(
            "| {} | {cmd} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
            r.function,
            r.runs,
            r.first_byte_median_ms,
            r.first_byte_p90_ms,
            r.gone_median_ms,
            r.gone_p90_ms
        );
    }
    println!();
}
