;; A hostile guest: a ReadStdin hostcall (op 2) whose buffer starts 256 bytes before the end
;; of 64 MiB of guest RAM and is 4096 bytes long (run with --mem 64).
(module
  (import "vmm_test" "hostcall" (func $hc (param i64 i64 i64 i64 i64) (result i64)))
  (func (export "_start")
    (drop (call $hc (i64.const 2) (i64.const 0x3ffff00) (i64.const 4096) (i64.const 0) (i64.const 0)))))
