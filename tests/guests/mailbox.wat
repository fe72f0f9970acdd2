;; A hostile guest: sends the hostcall given by its arguments through the raw test
;; import (enabled only with VMM_TEST_HOSTCALLS=1), e.g. an exit whose stdout range lies
;; far outside guest memory. The VMM must refuse it cleanly.
(module
  (import "vmm_test" "hostcall" (func $hc (param i64 i64 i64 i64 i64) (result i64)))
  (func (export "_start")
    ;; op 4 = Exit: code 0, stdout at 1 TiB, length 4096.
    (drop (call $hc (i64.const 4) (i64.const 0) (i64.const 0x10000000000) (i64.const 4096) (i64.const 0)))))
