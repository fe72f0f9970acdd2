;; A guest that never finishes: the VMM's --timeout must stop it.
(module (func (export "_start") (loop $l (br $l))))
