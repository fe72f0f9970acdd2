;; A hostile guest: a GetFunction hostcall (op 1) with a buffer length of u64::MAX.
(module
  (import "vmm_test" "hostcall" (func $hc (param i64 i64 i64 i64 i64) (result i64)))
  (func (export "_start")
    (drop (call $hc (i64.const 1) (i64.const 0x100000) (i64.const -1) (i64.const 0) (i64.const 0)))))
