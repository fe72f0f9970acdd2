;; Reads its request first (so it can be a function template), then acts on its first byte:
;; `l` loops forever, `t` traps (unreachable), `e` exits with code 3, `s` spins ~200 ms of
;; work, anything else echoes the request.
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (local $n i32) (local $c i32) (local $i i64)
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 4096))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (local.set $n (i32.load (i32.const 8)))
    (local.set $c (i32.load8_u (i32.const 1024)))
    (if (i32.eq (local.get $c) (i32.const 108)) (then (loop $forever (br $forever))))
    (if (i32.eq (local.get $c) (i32.const 116)) (then unreachable))
    (if (i32.eq (local.get $c) (i32.const 101)) (then (call $proc_exit (i32.const 3))))
    (if (i32.eq (local.get $c) (i32.const 115))
      (then (loop $spin
        (local.set $i (i64.add (local.get $i) (i64.const 1)))
        (br_if $spin (i64.lt_u (local.get $i) (i64.const 100000000))))))
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (local.get $n))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
