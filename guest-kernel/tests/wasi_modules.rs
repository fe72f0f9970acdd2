//! Small WAT modules run through the runner with an in-memory host.

mod common;

use common::TestHost;
use guest_kernel::{runner::run, Phase, RunError, RunOutput, Runtime};

fn wasm(wat: &str) -> Vec<u8> {
    wat::parse_str(wat).expect("valid wat")
}

fn run_wat(host: &mut TestHost, wat: &str) -> Result<RunOutput, RunError> {
    run(host, &wasm(wat), Runtime::Wasi, false)
}

fn stdout(host: &TestHost, out: &RunOutput) -> String {
    let mut s = host.flushed_stdout.clone();
    s.extend_from_slice(&out.stdout);
    String::from_utf8(s).unwrap()
}

/// Echo stdin to stdout, then write each arg and env entry on its own line.
const ECHO: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $env_get (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  ;; iovec at 0: buf=1024 len=4096; nread at 16; nwritten at 20
  (func $write (param $ptr i32) (param $len i32)
    (i32.store (i32.const 32) (local.get $ptr))
    (i32.store (i32.const 36) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 32) (i32.const 1) (i32.const 20))))
  (func $strlen (param $p i32) (result i32) (local $n i32)
    (block $done (loop $l
      (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (br $l)))
    (local.get $n))
  (func $lines (param $ptrs i32) (param $count i32) (local $i i32) (local $s i32)
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (local.get $count)))
      (local.set $s (i32.load (i32.add (local.get $ptrs) (i32.shl (local.get $i) (i32.const 2)))))
      (call $write (local.get $s) (call $strlen (local.get $s)))
      (i32.store8 (i32.const 40) (i32.const 10))
      (call $write (i32.const 40) (i32.const 1))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l))))
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 3))  ;; small reads: several fd_read calls
    (block $eof (loop $l
      (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 16)))
      (br_if $eof (i32.eqz (i32.load (i32.const 16))))
      (call $write (i32.const 1024) (i32.load (i32.const 16)))
      (br $l)))
    ;; args: counts at 48/52, pointers at 8192, strings at 12288
    (drop (call $args_sizes_get (i32.const 48) (i32.const 52)))
    (drop (call $args_get (i32.const 8192) (i32.const 12288)))
    (call $lines (i32.const 8192) (i32.load (i32.const 48)))
    (drop (call $env_sizes_get (i32.const 48) (i32.const 52)))
    (drop (call $env_get (i32.const 8192) (i32.const 12288)))
    (call $lines (i32.const 8192) (i32.load (i32.const 48)))))
"#;

#[test]
fn echo_stdin_args_env() {
    let mut host = TestHost::new(
        &["prog", "a1", "b2"],
        &["K=V", "X=yz"],
        &[],
        b"hello stdin\n",
    );
    let out = run_wat(&mut host, ECHO).unwrap();
    assert_eq!(out.exit_code, 0);
    assert_eq!(
        stdout(&host, &out),
        "hello stdin\nprog\na1\nb2\nK=V\nX=yz\n"
    );
    assert_eq!(host.stdin_reads, 1, "stdin comes in one hostcall");
    assert_eq!(host.write_calls, 0);
    assert_eq!(host.marks.len(), 5);
    assert_eq!(host.marks[4], Phase::FunctionEnd);
}

#[test]
fn echo_with_chunked_stdin() {
    let mut host = TestHost::new(&["p"], &[], &[], b"0123456789abcdef");
    host.stdin_chunk = 5;
    let out = run_wat(&mut host, ECHO).unwrap();
    assert_eq!(stdout(&host, &out), "0123456789abcdefp\n");
    assert_eq!(host.stdin_reads, 4);
}

#[test]
fn unknown_import_is_instantiate_error() {
    let mut host = TestHost::new(&["p"], &[], &[], b"");
    let e = run_wat(
        &mut host,
        r#"(module (import "env" "foo" (func)) (func (export "_start")))"#,
    )
    .unwrap_err();
    assert_eq!(e.code, vmm_abi::ERR_INSTANTIATE);
    assert_eq!(
        e.message,
        "module imports env.foo, which this runtime does not provide"
    );
    assert_eq!(host.marks, vec![Phase::Compiled]);
}

#[test]
fn wrong_wasi_signature_is_instantiate_error() {
    let mut host = TestHost::new(&["p"], &[], &[], b"");
    let e = run_wat(
        &mut host,
        r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32)))
                   (memory (export "memory") 1) (func (export "_start")))"#,
    )
    .unwrap_err();
    assert_eq!(e.code, vmm_abi::ERR_INSTANTIATE, "{}", e.message);
}

#[test]
fn test_hostcall_only_when_enabled() {
    let wat = r#"(module
      (import "vmm_test" "hostcall" (func $h (param i64 i64 i64 i64 i64) (result i64)))
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1)
      (func (export "_start")
        (call $exit (i32.wrap_i64 (call $h (i64.const 2) (i64.const 5) (i64.const 0) (i64.const 0) (i64.const 0))))))"#;
    let mut host = TestHost::new(&["p"], &[], &[], b"");
    let e = run(&mut host, &wasm(wat), Runtime::Wasi, false).unwrap_err();
    assert_eq!(e.code, vmm_abi::ERR_INSTANTIATE);
    assert!(e.message.contains("vmm_test.hostcall"), "{}", e.message);
    let mut host = TestHost::new(&["p"], &[], &[], b"");
    let out = run(&mut host, &wasm(wat), Runtime::Wasi, true).unwrap();
    assert_eq!(out.exit_code, 2005);
    assert_eq!(host.raw, vec![(2, [5, 0, 0, 0])]);
}

#[test]
fn unreachable_is_trap_and_output_is_flushed() {
    let mut host = TestHost::new(&["p"], &[], &[], b"");
    let e = run_wat(
        &mut host,
        r#"(module
          (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (data (i32.const 100) "before trap\n")
          (func (export "_start")
            (i32.store (i32.const 0) (i32.const 100))
            (i32.store (i32.const 4) (i32.const 12))
            (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
            (drop (call $w (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
            unreachable))"#,
    )
    .unwrap_err();
    assert_eq!(e.code, vmm_abi::ERR_TRAP);
    assert!(e.message.starts_with("wasm trap: "), "{}", e.message);
    assert!(e.message.contains("unreachable"), "{}", e.message);
    assert_eq!(host.flushed_stdout, b"before trap\n");
    assert_eq!(host.flushed_stderr, b"before trap\n");
    assert_eq!(host.marks.last(), Some(&Phase::FunctionEnd));
}

#[test]
fn not_wasm_is_module_invalid() {
    let mut host = TestHost::new(&["p"], &[], &[], b"");
    let e = run(&mut host, b"#!/bin/sh\necho hi\n", Runtime::Wasi, false).unwrap_err();
    assert_eq!(e.code, vmm_abi::ERR_MODULE_INVALID);
    assert!(
        e.message.starts_with("module is not valid WebAssembly: "),
        "{}",
        e.message
    );
    assert!(host.marks.is_empty());
}

#[test]
fn invalid_function_body_is_module_invalid() {
    // Well-formed binary, but the body does not type-check (validation is on).
    let mut host = TestHost::new(&["p"], &[], &[], b"");
    let bytes: Vec<u8> = vec![
        0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // header
        0x01, 0x05, 0x01, 0x60, 0x00, 0x01, 0x7f, // type: () -> i32
        0x03, 0x02, 0x01, 0x00, // func 0: type 0
        0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b, // body: empty (missing i32 result)
    ];
    let e = run(&mut host, &bytes, Runtime::Wasi, false).unwrap_err();
    assert_eq!(e.code, vmm_abi::ERR_MODULE_INVALID, "{}", e.message);
}

#[test]
fn proc_exit_sets_exit_code() {
    let mut host = TestHost::new(&["p"], &[], &[], b"");
    let out = run_wat(
        &mut host,
        r#"(module
          (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
          (memory (export "memory") 1)
          (func (export "_start") (call $exit (i32.const 7)) unreachable))"#,
    )
    .unwrap();
    assert_eq!(out.exit_code, 7);
    assert_eq!(host.marks.last(), Some(&Phase::FunctionEnd));
}

#[test]
fn unimplemented_wasi_function_returns_enosys() {
    let mut host = TestHost::new(&["p"], &[], &[], b"");
    let out = run_wat(
        &mut host,
        r#"(module
          (import "wasi_snapshot_preview1" "sock_accept" (func $sa (param i32 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "proc_raise" (func $pr (param i32) (result i32)))
          (import "wasi_snapshot_preview1" "path_unlink_file" (func $ul (param i32 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
          (memory (export "memory") 1)
          (func (export "_start")
            (if (i32.ne (call $pr (i32.const 9)) (i32.const 52)) (then (call $exit (i32.const 2))))
            (if (i32.ne (call $ul (i32.const 3) (i32.const 0) (i32.const 1)) (i32.const 69)) (then (call $exit (i32.const 3))))
            (call $exit (call $sa (i32.const 3) (i32.const 0) (i32.const 0)))))"#,
    )
    .unwrap();
    assert_eq!(out.exit_code, 52, "ENOSYS");
}

#[test]
fn missing_start_is_instantiate_error() {
    let mut host = TestHost::new(&["p"], &[], &[], b"");
    let e = run_wat(&mut host, r#"(module (memory (export "memory") 1))"#).unwrap_err();
    assert_eq!(e.code, vmm_abi::ERR_INSTANTIATE);
    assert_eq!(e.message, "module has no _start export");
}

#[test]
fn bad_config_is_config_error() {
    let mut host = TestHost::new(&["p"], &[], &[], b"");
    host.config = b"nope".to_vec();
    let e = run_wat(&mut host, r#"(module (func (export "_start")))"#).unwrap_err();
    assert_eq!(e.code, vmm_abi::ERR_CONFIG);
    // A file that is also a directory.
    let mut host = TestHost::new(&["p"], &[], &[("a", b"1"), ("a/b", b"2")], b"");
    let e = run_wat(&mut host, r#"(module (func (export "_start")))"#).unwrap_err();
    assert_eq!(e.code, vmm_abi::ERR_CONFIG, "{}", e.message);
}

#[test]
fn initialize_runs_before_get_function() {
    // A WASI module with _initialize: it runs, and a trap there is ERR_RUNTIME_INIT.
    let mut host = TestHost::new(&["p"], &[], &[], b"");
    let e = run_wat(
        &mut host,
        r#"(module (func (export "_initialize") unreachable) (func (export "_start")))"#,
    )
    .unwrap_err();
    assert_eq!(e.code, vmm_abi::ERR_RUNTIME_INIT);
    assert_eq!(host.get_function_calls, 0);
}

#[test]
fn reads_a_config_file_through_path_open() {
    let wat = r#"(module
      (import "wasi_snapshot_preview1" "path_open" (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1)
      (data (i32.const 200) "lib/x.txt")
      (func (export "_start") (local $e i32)
        (local.set $e (call $open (i32.const 3) (i32.const 0) (i32.const 200) (i32.const 9)
                                  (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 100)))
        (if (local.get $e) (then (call $exit (local.get $e))))
        (i32.store (i32.const 0) (i32.const 1024))
        (i32.store (i32.const 4) (i32.const 100))
        (drop (call $read (i32.load (i32.const 100)) (i32.const 0) (i32.const 1) (i32.const 8)))
        (i32.store (i32.const 4) (i32.load (i32.const 8)))
        (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;
    let mut host = TestHost::new(&["p"], &[], &[("lib/x.txt", b"file data")], b"");
    let out = run_wat(&mut host, wat).unwrap();
    assert_eq!(out.exit_code, 0);
    assert_eq!(stdout(&host, &out), "file data");
}

#[test]
fn random_get_uses_host_entropy() {
    let wat = r#"(module
      (import "wasi_snapshot_preview1" "random_get" (func $r (param i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "_start")
        (drop (call $r (i32.const 100) (i32.const 32)))
        (i32.store (i32.const 0) (i32.const 100))
        (i32.store (i32.const 4) (i32.const 32))
        (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;
    let mut a = TestHost::new(&["p"], &[], &[], b"");
    a.entropy = Some([1; 32]);
    let oa = run_wat(&mut a, wat).unwrap();
    let mut b = TestHost::new(&["p"], &[], &[], b"");
    b.entropy = Some([2; 32]);
    let ob = run_wat(&mut b, wat).unwrap();
    assert_eq!(oa.stdout.len(), 32);
    assert_ne!(oa.stdout, ob.stdout);
    assert_eq!(a.entropy_calls, 1);
}

#[test]
fn dev_urandom_reads_return_fresh_bytes() {
    // Open dev/urandom relative to the preopen, read 16 bytes twice (into 100 and 116),
    // write all 32 to stdout. fdstat's filetype goes to byte 300 of the output region.
    let wat = r#"(module
      (import "wasi_snapshot_preview1" "path_open" (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "fd_fdstat_get" (func $fdstat (param i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1)
      (data (i32.const 200) "dev/urandom")
      (func $read16 (param $fd i32) (param $at i32)
        (i32.store (i32.const 0) (local.get $at))
        (i32.store (i32.const 4) (i32.const 16))
        (if (call $read (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))
          (then (call $exit (i32.const 90))))
        (if (i32.ne (i32.load (i32.const 8)) (i32.const 16))
          (then (call $exit (i32.const 91)))))
      (func (export "_start") (local $e i32) (local $fd i32)
        (local.set $e (call $open (i32.const 3) (i32.const 0) (i32.const 200) (i32.const 11)
                                  (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 96)))
        (if (local.get $e) (then (call $exit (local.get $e))))
        (local.set $fd (i32.load (i32.const 96)))
        (drop (call $fdstat (local.get $fd) (i32.const 400)))
        (i32.store8 (i32.const 132) (i32.load8_u (i32.const 400)))
        (call $read16 (local.get $fd) (i32.const 100))
        (call $read16 (local.get $fd) (i32.const 116))
        (i32.store (i32.const 0) (i32.const 100))
        (i32.store (i32.const 4) (i32.const 33))
        (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;
    let mut a = TestHost::new(&["p"], &[], &[], b"");
    a.entropy = Some([1; 32]);
    let oa = run_wat(&mut a, wat).unwrap();
    assert_eq!(oa.exit_code, 0);
    assert_eq!(oa.stdout.len(), 33);
    assert_ne!(oa.stdout[..16], oa.stdout[16..32], "two reads, fresh bytes");
    assert_ne!(oa.stdout[..16], [0; 16]);
    assert_eq!(oa.stdout[32], 2, "a character device");
    assert_eq!(a.entropy_calls, 2, "entropy is asked for before every read");
    // Other host entropy, other bytes.
    let mut b = TestHost::new(&["p"], &[], &[], b"");
    b.entropy = Some([2; 32]);
    let ob = run_wat(&mut b, wat).unwrap();
    assert_ne!(oa.stdout[..32], ob.stdout[..32]);
}
