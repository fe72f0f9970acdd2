;; A hostile guest: a memory grant that is not a run of whole 2 MiB regions.
(module
  (import "vmm_test" "hostcall" (func $hc (param i64 i64 i64 i64 i64) (result i64)))
  (func (export "_start") (drop (call $hc (i64.const 8) (i64.const 0x201000) (i64.const 0x200000) (i64.const 0) (i64.const 0)))))
