;; A hostile guest: a memory grant past the end of guest RAM (64 MiB).
(module
  (import "vmm_test" "hostcall" (func $hc (param i64 i64 i64 i64 i64) (result i64)))
  (func (export "_start") (drop (call $hc (i64.const 8) (i64.const 0x3e00000) (i64.const 0x400000) (i64.const 0) (i64.const 0)))))
