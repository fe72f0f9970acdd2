;; A guest that asks for every other 2 MiB region of its 1 GiB of RAM, one at a time (256
;; grants, each a memory slot of its own unless the VMM merges them), then writes "ok".
(module
  (import "vmm_test" "hostcall" (func $hc (param i64 i64 i64 i64 i64) (result i64)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "ok")
  (func (export "_start") (local $i i64)
    (loop $l
      (if (i64.ne (call $hc (i64.const 8) (i64.mul (local.get $i) (i64.const 0x400000)) (i64.const 0x200000) (i64.const 0) (i64.const 0)) (i64.const 0))
        (then unreachable))
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br_if $l (i64.lt_u (local.get $i) (i64.const 256))))
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 2))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
