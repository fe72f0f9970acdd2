//! Section `store`: what function templates on one runtime base take on disk.

use super::process::{create_template, s};
use super::util::finite_or_zero;
use super::BenchArgs;
use std::path::Path;

/// Disk use of `templates` JavaScript function templates on one runtime base.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoreReport {
    pub templates: usize,
    pub first_template_bytes: u64,
    pub max_increment_bytes: u64,
    pub avg_increment_bytes: f64,
    pub max_increment_pct_of_first: f64,
    /// What full snapshots of every function template would take.
    pub logical_bytes: u64,
    /// What the store takes on disk.
    pub physical_bytes: u64,
    pub dedup_ratio: f64,
}

pub(super) fn dir_bytes(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_bytes(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Section `store`: `--templates` different JavaScript functions on one runtime base, in a
/// store of their own; what each adds on disk, against what full snapshots would take.
pub(super) fn store_dedup(a: &BenchArgs, store: &Path) -> Result<StoreReport, String> {
    let dedup_store = store.join("dedup");
    let scripts = std::env::temp_dir().join(format!("vmm-bench-fns-{}", std::process::id()));
    std::fs::create_dir_all(&scripts).map_err(|e| format!("create {}: {e}", scripts.display()))?;
    let sizes = create_function_templates(a, &dedup_store, &scripts);
    let _ = std::fs::remove_dir_all(&scripts);
    let sizes = sizes?;
    let first = sizes.first().copied().unwrap_or(0);
    let increments: Vec<u64> = sizes
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .collect();
    let max_inc = increments.iter().copied().max().unwrap_or(0);
    let avg_inc = if increments.is_empty() {
        0.0
    } else {
        increments.iter().sum::<u64>() as f64 / increments.len() as f64
    };
    let logical = logical_bytes(&dedup_store, a.templates)?;
    let physical = sizes.last().copied().unwrap_or(0);
    Ok(StoreReport {
        templates: a.templates,
        first_template_bytes: first,
        max_increment_bytes: max_inc,
        avg_increment_bytes: avg_inc,
        max_increment_pct_of_first: 100.0 * max_inc as f64 / first.max(1) as f64,
        logical_bytes: logical,
        physical_bytes: physical,
        dedup_ratio: logical as f64 / physical.max(1) as f64,
    })
}

/// Create templates `fn0`.. in `dedup_store`, each from its own script written to `scripts`;
/// returns the store's size on disk after each.
pub(super) fn create_function_templates(
    a: &BenchArgs,
    dedup_store: &Path,
    scripts: &Path,
) -> Result<Vec<u64>, String> {
    let hello = std::fs::read_to_string(a.examples.join("hello.js")).map_err(|e| e.to_string())?;
    let mut sizes = Vec::new();
    for i in 0..a.templates {
        // Twenty different functions: each greets differently and computes its own field.
        let src = format!(
            "{}\nconst extra{i} = Array.from({{ length: {n} }}, (_, k) => k * {i}).reduce((x, y) => x + y, 0);\n",
            hello.replace("Hello", &format!("Greeting{i}")),
            n = 10 + i
        );
        let file = scripts.join(format!("fn{i}.js"));
        std::fs::write(&file, src).map_err(|e| e.to_string())?;
        let function_args = [
            "--module".into(),
            s(&a.qjs),
            "--runtime".into(),
            "qjs".into(),
            "--file".into(),
            s(&file),
            "--arg".into(),
            format!("fn{i}.js"),
        ];
        create_template(&format!("fn{i}"), dedup_store, &function_args)?;
        sizes.push(dir_bytes(dedup_store));
    }
    Ok(sizes)
}

/// What full snapshots of templates `fn0`.. in `dedup_store` would take: their non-zero pages.
pub(super) fn logical_bytes(dedup_store: &Path, templates: usize) -> Result<u64, String> {
    let st = snapshot_store::Store::open(dedup_store).map_err(|e| e.to_string())?;
    let mut total = 0u64;
    for i in 0..templates {
        let t = st.load(&format!("fn{i}")).map_err(|e| e.to_string())?;
        let r = t.resolve(&st).map_err(|e| e.to_string())?;
        total += r.nonzero_frames() * 4096;
    }
    Ok(total)
}

pub(super) fn print_store(r: &StoreReport) {
    println!(
        "## Store: {} JavaScript function templates on one runtime base\n",
        r.templates
    );
    println!("| first template (with its base) | largest later increment | average increment | logical (full snapshots) | physical on disk | dedup |");
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {:.2} MiB | {:.1} KiB ({:.1}% of first) | {:.1} KiB | {:.1} MiB | {:.2} MiB | {:.1}x |",
        r.first_template_bytes as f64 / 1048576.0,
        r.max_increment_bytes as f64 / 1024.0,
        finite_or_zero(r.max_increment_pct_of_first),
        r.avg_increment_bytes / 1024.0,
        r.logical_bytes as f64 / 1048576.0,
        r.physical_bytes as f64 / 1048576.0,
        finite_or_zero(r.dedup_ratio)
    );
    println!();
}
