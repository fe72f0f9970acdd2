;; A hostile guest: a Panic hostcall (op 6) whose message is 1 GiB long.
(module
  (import "vmm_test" "hostcall" (func $hc (param i64 i64 i64 i64 i64) (result i64)))
  (func (export "_start")
    (drop (call $hc (i64.const 6) (i64.const 0x100000) (i64.const 0x40000000) (i64.const 0) (i64.const 0)))))
