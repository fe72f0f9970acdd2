;; A hostile guest: floods stdout with 64 KiB writes forever and ignores every error
;; (the WASI layer caps output at 64 MiB and then answers EFBIG). Only --timeout stops it.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "_start")
    ;; 64 KiB of 'x' at 0x10000, one iovec at 0.
    (memory.fill (i32.const 0x10000) (i32.const 0x78) (i32.const 0x10000))
    (i32.store (i32.const 0) (i32.const 0x10000))
    (i32.store (i32.const 4) (i32.const 0x10000))
    (loop $l
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (br $l))))
