;; A function that grows its memory on every request: reads its request, then
;;   "g": grows memory by one page, reads the first word of the new page (fresh memory
;;        must read 0), writes a marker there, prints "grew from N saw V\n";
;;   "G": the same with 40 pages (2.5 MiB: under wasmtime the guest maps a new 2 MiB block
;;        and turns the first one into a 2 MiB page), V being the sum of the first and
;;        last word of every new page;
;;   "p": reads the word just past the end of its memory, which must trap (out of bounds);
;;        prints "probe read V\n" if it did not.
;; A pooled instance reset after a "g" request must answer the next request exactly like a
;; fresh restore: same memory size, a new page that reads 0, and no access to the page an
;; earlier request added.
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 256) "grew from ")
  (data (i32.const 288) " saw ")
  (data (i32.const 320) "probe read ")
  ;; $n in decimal at $at; returns the address after it
  (func $num (param $n i32) (param $at i32) (result i32)
    (local $len i32) (local $t i32) (local $i i32)
    (local.set $t (local.get $n))
    (loop $count
      (local.set $len (i32.add (local.get $len) (i32.const 1)))
      (local.set $t (i32.div_u (local.get $t) (i32.const 10)))
      (br_if $count (local.get $t)))
    (local.set $i (local.get $len))
    (loop $digit
      (local.set $i (i32.sub (local.get $i) (i32.const 1)))
      (i32.store8 (i32.add (local.get $at) (local.get $i))
        (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $digit (local.get $i)))
    (i32.add (local.get $at) (local.get $len)))
  (func $print (param $from i32) (param $to i32)
    (i32.store (i32.const 0) (local.get $from))
    (i32.store (i32.const 4) (i32.sub (local.get $to) (local.get $from)))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func (export "_start")
    (local $old i32) (local $v i32) (local $at i32) (local $n i32) (local $page i32)
    ;; the request: one fd_read of up to 64 bytes at 1024 (iovec at 16, nread at 24)
    (i32.store (i32.const 16) (i32.const 1024))
    (i32.store (i32.const 20) (i32.const 64))
    (drop (call $fd_read (i32.const 0) (i32.const 16) (i32.const 1) (i32.const 24)))
    (if (i32.eq (i32.load8_u (i32.const 1024)) (i32.const 112)) ;; 'p'
      (then
        (local.set $v (i32.load (i32.mul (memory.size) (i32.const 65536))))
        (memory.copy (i32.const 2048) (i32.const 320) (i32.const 11))
        (local.set $at (call $num (local.get $v) (i32.const 2059)))
        (i32.store8 (local.get $at) (i32.const 10))
        (call $print (i32.const 2048) (i32.add (local.get $at) (i32.const 1)))
        (return)))
    (local.set $n (select (i32.const 40) (i32.const 1)
      (i32.eq (i32.load8_u (i32.const 1024)) (i32.const 71)))) ;; 'G'
    (local.set $old (memory.grow (local.get $n)))
    (local.set $page (local.get $old))
    (loop $each
      (local.set $at (i32.mul (local.get $page) (i32.const 65536)))
      (local.set $v (i32.add (local.get $v)
        (i32.add (i32.load (local.get $at)) (i32.load (i32.add (local.get $at) (i32.const 65532))))))
      (i32.store (local.get $at) (i32.const 0x55aa55aa))
      (i32.store (i32.add (local.get $at) (i32.const 65532)) (i32.const 0x55aa55aa))
      (local.set $page (i32.add (local.get $page) (i32.const 1)))
      (br_if $each (i32.lt_u (local.get $page) (i32.add (local.get $old) (local.get $n)))))
    (memory.copy (i32.const 2048) (i32.const 256) (i32.const 10))
    (local.set $at (call $num (local.get $old) (i32.const 2058)))
    (memory.copy (local.get $at) (i32.const 288) (i32.const 5))
    (local.set $at (call $num (local.get $v) (i32.add (local.get $at) (i32.const 5))))
    (i32.store8 (local.get $at) (i32.const 10))
    (call $print (i32.const 2048) (i32.add (local.get $at) (i32.const 1)))))
