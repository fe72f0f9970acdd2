;; A hostile guest: reports a CPU exception (op 5, Fault) on its own: a #GP (vector 13),
;; error code 0x18, rip 0xdeadbeef, cr2 0x1234, rsp 0xe00000.
(module
  (import "vmm_test" "hostcall" (func $hc (param i64 i64 i64 i64 i64) (result i64)))
  (func (export "_start")
    (drop (call $hc (i64.const 5) (i64.const 13) (i64.const 0x18) (i64.const 0xdeadbeef) (i64.const 0x1234)))))
