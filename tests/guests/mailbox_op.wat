;; A hostile guest: an op code the ABI does not define.
(module
  (import "vmm_test" "hostcall" (func $hc (param i64 i64 i64 i64 i64) (result i64)))
  (func (export "_start") (drop (call $hc (i64.const 0xdead) (i64.const 0) (i64.const 0) (i64.const 0) (i64.const 0)))))
