;; A hostile guest: a Write hostcall whose length wraps around the address space.
(module
  (import "vmm_test" "hostcall" (func $hc (param i64 i64 i64 i64 i64) (result i64)))
  (func (export "_start")
    ;; op 3 = Write: fd 1, gpa 0x100000, len 2^64 - 1.
    (drop (call $hc (i64.const 3) (i64.const 1) (i64.const 0x100000) (i64.const -1) (i64.const 0)))))
