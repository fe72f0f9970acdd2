;; A compute-heavy module for the native-speed bench: a sieve of Eratosthenes over 1 MiB,
;; repeated, plus an xorshift hash over the result. No imports, so the very same bytes run
;; under wasmi in the guest and in a plain host process. `_start` stores the checksum in
;; the exported global `result`.
(module
  (memory (export "memory") 17)
  (global $result (export "result") (mut i64) (i64.const 0))
  (func $sieve (param $n i32) (result i32) (local $i i32) (local $j i32) (local $count i32)
    (memory.fill (i32.const 0) (i32.const 0) (local.get $n))
    (local.set $i (i32.const 2))
    (block $done (loop $outer
      (br_if $done (i32.gt_u (i32.mul (local.get $i) (local.get $i)) (local.get $n)))
      (if (i32.eqz (i32.load8_u (local.get $i)))
        (then
          (local.set $j (i32.mul (local.get $i) (local.get $i)))
          (block $end (loop $inner
            (br_if $end (i32.ge_u (local.get $j) (local.get $n)))
            (i32.store8 (local.get $j) (i32.const 1))
            (local.set $j (i32.add (local.get $j) (local.get $i)))
            (br $inner)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $outer)))
    (local.set $i (i32.const 2))
    (block $done2 (loop $count_loop
      (br_if $done2 (i32.ge_u (local.get $i) (local.get $n)))
      (local.set $count (i32.add (local.get $count) (i32.eqz (i32.load8_u (local.get $i)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $count_loop)))
    (local.get $count))
  (func $run (export "run") (param $rounds i32) (result i64) (local $h i64) (local $r i32)
    (local.set $h (i64.const 0x9e3779b97f4a7c15))
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $r) (local.get $rounds)))
      (local.set $h (i64.xor (local.get $h) (i64.extend_i32_u (call $sieve (i32.const 1048576)))))
      (local.set $h (i64.xor (local.get $h) (i64.shl (local.get $h) (i64.const 13))))
      (local.set $h (i64.xor (local.get $h) (i64.shr_u (local.get $h) (i64.const 7))))
      (local.set $h (i64.xor (local.get $h) (i64.shl (local.get $h) (i64.const 17))))
      (local.set $r (i32.add (local.get $r) (i32.const 1)))
      (br $l)))
    (local.get $h))
  (func (export "_start") (global.set $result (call $run (i32.const 40)))))
