//! Section `throughput`: `vmm restore` processes per second.

use super::process::{create_template, invoke, s};
use super::util::finite_or_zero;
use super::{BenchArgs, Function};
use std::path::Path;
use std::time::{Duration, Instant};

/// `vmm restore` processes completed by `restorers` concurrent callers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ThroughputRow {
    pub restorers: usize,
    pub restores: u64,
    pub per_second: f64,
}

/// Section `throughput`: `vmm restore` processes of `hello` per second, from one and from two
/// concurrent callers, `--seconds` each.
pub(super) fn throughput(
    a: &BenchArgs,
    store: &Path,
    hello: &Function,
) -> Result<Vec<ThroughputRow>, String> {
    create_template("tput", store, &hello.args)?;
    [1usize, 2]
        .into_iter()
        .map(|workers| restores_per_second(store, hello, workers, a.seconds))
        .collect()
}

/// `workers` threads each restore `tput` from `store` in a loop for `seconds`.
pub(super) fn restores_per_second(
    store: &Path,
    f: &Function,
    workers: usize,
    seconds: f64,
) -> Result<ThroughputRow, String> {
    let args = vec![
        "restore".to_string(),
        "tput".into(),
        "--store".into(),
        s(store),
    ];
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let t0 = Instant::now();
    let counts: Vec<Result<u64, String>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..workers)
            .map(|_| {
                sc.spawn(|| {
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        invoke(&args, f.input)?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("worker panicked".into())))
            .collect()
    });
    let total: u64 = counts
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .sum();
    let secs = t0.elapsed().as_secs_f64();
    Ok(ThroughputRow {
        restorers: workers,
        restores: total,
        per_second: total as f64 / secs,
    })
}

pub(super) fn print_throughput(seconds: f64, rows: &[ThroughputRow]) {
    println!("## Restores per second (hello, `vmm restore` processes, {seconds} s each)\n");
    println!("| concurrent restorers | restores | per second |");
    println!("|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {:.1} |",
            r.restorers,
            r.restores,
            finite_or_zero(r.per_second)
        );
    }
    println!();
}
