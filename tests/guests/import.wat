;; A module that needs an import this runtime does not provide.
(module (import "env" "launch_missiles" (func (param i32))) (func (export "_start")))
