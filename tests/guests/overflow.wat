;; Writes 65 MiB (one more than the 64 MiB output cap) in 64 KiB writes, ignoring the
;; EFBIG it gets past the cap, then exits 0: to stdout, or to stderr when given an argument.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "_start")
    (local $fd i32) (local $i i32)
    (drop (call $args_sizes_get (i32.const 16) (i32.const 20)))
    (local.set $fd (select (i32.const 2) (i32.const 1) (i32.gt_u (i32.load (i32.const 16)) (i32.const 1))))
    ;; 64 KiB of 'y' at 0x10000, one iovec at 0.
    (memory.fill (i32.const 0x10000) (i32.const 0x79) (i32.const 0x10000))
    (i32.store (i32.const 0) (i32.const 0x10000))
    (i32.store (i32.const 4) (i32.const 0x10000))
    (loop $l
      (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 1040))))))
