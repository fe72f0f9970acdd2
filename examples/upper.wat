;; A small WASI command module: copies stdin to stdout in upper case, then prints its
;; arguments, one per line. `vmm run --module examples/upper.wat --arg a --arg b < in.txt`
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  ;; 0..8: iovec, 8: nread/nwritten, 16: argc, 20: argv_buf_size, 1024..: buffer
  ;; 65536..: argv pointers, 69632..: argv strings
  (func $write (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func $strlen (param $p i32) (result i32) (local $n i32)
    (block $done (loop $next
      (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (br $next)))
    (local.get $n))
  (func (export "_start") (local $n i32) (local $i i32) (local $c i32) (local $arg i32)
    (block $eof (loop $read
      (i32.store (i32.const 0) (i32.const 1024))
      (i32.store (i32.const 4) (i32.const 4096))
      (br_if $eof (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
      (local.set $n (i32.load (i32.const 8)))
      (br_if $eof (i32.eqz (local.get $n)))
      (local.set $i (i32.const 0))
      (loop $up
        (local.set $c (i32.load8_u (i32.add (i32.const 1024) (local.get $i))))
        (if (i32.and (i32.ge_u (local.get $c) (i32.const 97)) (i32.le_u (local.get $c) (i32.const 122)))
          (then (i32.store8 (i32.add (i32.const 1024) (local.get $i)) (i32.sub (local.get $c) (i32.const 32)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br_if $up (i32.lt_u (local.get $i) (local.get $n))))
      (call $write (i32.const 1024) (local.get $n))
      (br $read)))
    (drop (call $args_sizes_get (i32.const 16) (i32.const 20)))
    (drop (call $args_get (i32.const 65536) (i32.const 69632)))
    (local.set $i (i32.const 1))
    (block $done (loop $args
      (br_if $done (i32.ge_u (local.get $i) (i32.load (i32.const 16))))
      (local.set $arg (i32.load (i32.add (i32.const 65536) (i32.mul (local.get $i) (i32.const 4)))))
      (call $write (local.get $arg) (call $strlen (local.get $arg)))
      (i32.store8 (i32.const 1000) (i32.const 10))
      (call $write (i32.const 1000) (i32.const 1))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $args)))))
