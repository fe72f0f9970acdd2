;; A hostile guest: grows its memory one page at a time until memory.grow fails, writes to
;; the last byte of the last page it got, then prints "grew N pages\n" (N = pages held).
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "grew ")
  (func $digits (param $n i32) (param $at i32) (result i32)
    ;; writes decimal $n backwards ending before $at; returns the start address
    (loop $l
      (local.set $at (i32.sub (local.get $at) (i32.const 1)))
      (i32.store8 (local.get $at) (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $l (local.get $n)))
    (local.get $at))
  (func (export "_start")
    (local $pages i32) (local $start i32)
    (block $done
      (loop $l
        (br_if $done (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
        (br $l)))
    (local.set $pages (memory.size))
    ;; touch the very last byte of memory
    (i32.store8 (i32.sub (i32.mul (local.get $pages) (i32.const 65536)) (i32.const 1)) (i32.const 0xaa))
    ;; "grew " is at 16..21; the number goes right after it: build it at 64.. backwards
    (local.set $start (call $digits (local.get $pages) (i32.const 64)))
    (memory.copy (i32.const 21) (local.get $start) (i32.sub (i32.const 64) (local.get $start)))
    (local.set $start (i32.add (i32.const 21) (i32.sub (i32.const 64) (local.get $start))))
    (memory.copy (local.get $start) (i32.const 80) (i32.const 7))
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.add (i32.sub (local.get $start) (i32.const 16)) (i32.const 7)))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  (data (i32.const 80) " pages\n"))
