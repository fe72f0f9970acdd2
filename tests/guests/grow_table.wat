;; A hostile guest: grows an unbounded funcref table by 1M entries at a time until
;; table.grow fails (or the guest heap runs out), then prints "table full\n".
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (table $t 0 funcref)
  (data (i32.const 100) "table full\n")
  (func (export "_start")
    (block $done
      (loop $l
        (br_if $done (i32.eq (table.grow $t (ref.null func) (i32.const 0x100000)) (i32.const -1)))
        (br $l)))
    (i32.store (i32.const 0) (i32.const 100))
    (i32.store (i32.const 4) (i32.const 11))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
