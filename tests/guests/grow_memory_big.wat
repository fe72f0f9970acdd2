;; A hostile guest: asks for all 4 GiB of wasm memory in one memory.grow (65535 pages), then
;; keeps asking for 16 MiB more until that fails, and finally writes to the last page.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "big grow refused\n")
  (data (i32.const 200) "big grow granted\n")
  (func (export "_start")
    (local $msg i32)
    (local.set $msg (i32.const 100))
    (if (i32.ne (memory.grow (i32.const 65535)) (i32.const -1))
      (then (local.set $msg (i32.const 200))))
    (block $done
      (loop $l
        (br_if $done (i32.eq (memory.grow (i32.const 256)) (i32.const -1)))
        (br $l)))
    (i32.store8 (i32.sub (i32.mul (memory.size) (i32.const 65536)) (i32.const 1)) (i32.const 0xaa))
    (i32.store (i32.const 0) (local.get $msg))
    (i32.store (i32.const 4) (i32.const 17))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
