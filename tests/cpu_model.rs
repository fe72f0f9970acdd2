//! The guest CPU model: what the guest's own `cpuid` reports (its self-report in
//! `--stats --json`) against the features its module was compiled for, a model made
//! smaller with `VMM_CPU_WITHOUT` (another artifact-cache key, its guest sees less), and
//! templates moving between models: a superset restores, a model lacking a feature the
//! template's had is refused naming both. Real binary, real store, /dev/kvm.

mod common;
use common::*;

const REQUEST: &[u8] = br#"{"name":"cpu"}"#;
const RESPONSE: &str = "{\"greeting\":\"Hello, cpu!\",\"length\":3}\n";

/// `vmm run --json` of hello.js (wasmtime, `store` as the artifact cache), with
/// `VMM_CPU_WITHOUT=without` when given: its `stats`.
fn hello(store: &TempDir, without: Option<&str>) -> serde_json::Value {
    let env: Vec<(&str, &str)> = without
        .map(|w| ("VMM_CPU_WITHOUT", w))
        .into_iter()
        .collect();
    let function = qjs_function_args("hello.js", &[]);
    let (v, stderr) = run_json_with(store, &function, REQUEST, &env);
    assert_eq!(v["exit_code"], 0, "{v} / {stderr}");
    assert_eq!(v["stdout"], RESPONSE, "{v}");
    v["stats"].clone()
}

fn list(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("a list: {v}"))
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

/// The features a model record (`pvm/GenuineIntel/fxsr,sse,...`) names.
fn model_features(stats: &serde_json::Value) -> Vec<String> {
    let model = stats["cpu"]["model"].as_str().expect("a model").to_string();
    let parts: Vec<&str> = model.splitn(3, '/').collect();
    assert_eq!(parts.len(), 3, "{model}");
    parts[2].split(',').map(String::from).collect()
}

#[test]
fn the_guest_sees_every_feature_its_module_was_compiled_for() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("cpu-sees");
    let stats = hello(&store, None);
    let cpu = &stats["cpu"];
    let seen = list(&cpu["guest_sees"]);
    let compiled = list(&cpu["compiled_for"]);
    let model = model_features(&stats);
    // SSE up to 4.2 and POPCNT are what every artifact is compiled with.
    for f in ["sse3", "ssse3", "sse4.1", "sse4.2", "popcnt"] {
        assert!(compiled.contains(&f.to_string()), "{f} not in {cpu}");
    }
    for f in &compiled {
        assert!(
            seen.contains(f),
            "compiled for {f}, which the guest's cpuid does not report: {cpu}"
        );
        assert!(
            model.contains(f),
            "compiled for {f}, not in the model: {cpu}"
        );
    }
    for f in ["sse", "sse2"] {
        assert!(seen.contains(&f.to_string()), "{f}: {cpu}");
    }
    // The guest sees at least the model's features a guest may use (a host that does not
    // filter `cpuid` shows more); no guest code can use the others (they need XCR0 etc.).
    for f in model.iter().filter(|f| !f.starts_with("avx")) {
        if ["fma", "xsave", "f16c", "mpx", "pku", "vaes", "vpclmulqdq"].contains(&f.as_str()) {
            continue;
        }
        assert!(
            seen.contains(f),
            "the model has {f}, the guest does not see it: {cpu}"
        );
    }
    // wasmi compiles nothing on the host; its guest reports the same CPU.
    let mut cmd = vmm();
    cmd.args(["run", "--engine", "wasmi", "--json"])
        .args(qjs_function_args("hello.js", &[]));
    let r = run_with_input(cmd, REQUEST);
    let v: serde_json::Value = serde_json::from_str(r.stdout().trim()).unwrap();
    assert_eq!(v["stdout"], RESPONSE, "{v}");
    assert_eq!(
        list(&v["stats"]["cpu"]["compiled_for"]),
        Vec::<String>::new()
    );
    assert_eq!(list(&v["stats"]["cpu"]["guest_sees"]), seen, "{v}");
}

/// A feature of the model here that artifacts are compiled for when the model has it.
fn optional_feature(stats: &serde_json::Value) -> Option<String> {
    let compiled = list(&stats["cpu"]["compiled_for"]);
    ["lzcnt", "bmi2", "bmi1"]
        .into_iter()
        .map(String::from)
        .find(|f| compiled.contains(f))
}

#[test]
fn a_smaller_model_compiles_for_less_and_its_guest_sees_less() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("cpu-smaller");
    let full = hello(&store, None);
    let Some(f) = optional_feature(&full) else {
        eprintln!("SKIPPED: this host's model has none of lzcnt, bmi2, bmi1");
        return;
    };
    assert_eq!(full["artifact_cache"], "miss", "{full}");
    let small = hello(&store, Some(&f));
    // Another model, another key: the full model's artifact is not handed to this guest.
    assert_eq!(small["artifact_cache"], "miss", "{small}");
    assert!(!list(&small["cpu"]["compiled_for"]).contains(&f), "{small}");
    assert!(!model_features(&small).contains(&f), "{small}");
    assert_eq!(hello(&store, Some(&f))["artifact_cache"], "hit");
    assert_eq!(hello(&store, None)["artifact_cache"], "hit");
}

#[test]
fn a_template_restores_on_a_superset_model_and_is_refused_on_a_smaller_one() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("cpu-templates");
    let Some(f) = optional_feature(&hello(&store, None)) else {
        eprintln!("SKIPPED: this host's model has none of lzcnt, bmi2, bmi1");
        return;
    };
    let with = |cmd: &mut std::process::Command, without: Option<&str>| {
        if let Some(w) = without {
            cmd.env("VMM_CPU_WITHOUT", w);
        }
    };
    let create = |name: &str, without: Option<&str>| {
        let mut cmd = vmm();
        cmd.args(["template", "create", name, "--store", &store.arg()])
            .args(qjs_function_args("hello.js", &[]));
        with(&mut cmd, without);
        let r = run_with_input(cmd, b"");
        assert_eq!(r.code(), 0, "template create {name}: {}", r.stderr());
    };
    let restore = |name: &str, without: Option<&str>| {
        let mut cmd = vmm();
        cmd.args(["restore", name, "--store", &store.arg()]);
        with(&mut cmd, without);
        run_with_input(cmd, REQUEST)
    };
    // Made for the smaller model, restored on the full one: a superset runs it.
    create("small", Some(&f));
    let r = restore("small", None);
    assert_eq!(
        (r.code(), r.stdout().as_str()),
        (0, RESPONSE),
        "{}",
        r.stderr()
    );
    // Made for the full model, restored where the model lacks `f`: refused before the
    // guest runs, naming the feature and both models.
    create("full", None);
    let r = restore("full", Some(&f));
    let err = r.stderr();
    assert_eq!(r.code(), 125, "{err}");
    assert_eq!(r.stdout(), "", "{err}");
    assert!(err.contains(&format!("here lacks ({f})")), "{err}");
    assert!(
        err.contains("The guest CPU it was made for: ") && err.contains("; here: "),
        "{err}"
    );
    // And on its own model it still runs.
    let r = restore("full", None);
    assert_eq!(
        (r.code(), r.stdout().as_str()),
        (0, RESPONSE),
        "{}",
        r.stderr()
    );
}
