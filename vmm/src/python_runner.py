# How `--runtime python` runs a script: `python -c <this file> SCRIPT ARGS...`, which
# behaves as `python SCRIPT ARGS...` (argv, __main__, tracebacks, exit status) except for
# the two things below. Everything lives in one function, removed from __main__ before the
# script runs there.
def _vmm_python_runner():
    import atexit
    import io
    import os
    import sys

    # 1. Fresh randomness per restore. CPython seeds `random` from the OS when it is
    # imported, before a function template is taken (at the script's first read of its
    # request), so every restore would replay the same sequence. The first read of stdin
    # that returns is where a restored template resumes: `random` is reseeded there, from
    # os.urandom, which the guest serves with fresh host entropy after every restore.
    # A script that seeded `random` itself (seed(x) with x not None, or setstate) keeps its
    # sequence. (Random instances of its own made before that read are not reseeded.)
    # `random` is patched when the script imports it, not imported here: that would add
    # ~0.2 s under wasmi to every cold start.
    inst = None
    explicit = False
    pending = True

    def patch(random):
        nonlocal inst
        inst = random._inst

        def seed(a=None, version=2):
            nonlocal explicit
            explicit = a is not None
            inst.seed(a, version)

        def setstate(state):
            nonlocal explicit
            explicit = True
            inst.setstate(state)

        seed.__doc__ = inst.seed.__doc__
        setstate.__doc__ = inst.setstate.__doc__
        random.seed = seed
        random.setstate = setstate

    class Loader:
        # The loader of `random` while it is imported: patches it once it is executed, and
        # leaves the real loader in its place.
        def __init__(self, real):
            self.real = real

        def create_module(self, spec):
            return self.real.create_module(spec)

        def exec_module(self, module):
            try:
                self.real.exec_module(module)
            finally:
                module.__loader__ = module.__spec__.loader = self.real
            patch(module)

        def __getattr__(self, name):
            return getattr(self.real, name)

    class Finder:
        # First on sys.meta_path until `random` is found: the other finders find it, and
        # its loader is wrapped.
        def find_spec(self, name, path=None, target=None):
            if name != "random":
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    spec.loader = Loader(spec.loader)
                    sys.meta_path.remove(self)
                    return spec
            return None

    if "random" in sys.modules:
        patch(sys.modules["random"])
    else:
        sys.meta_path.insert(0, Finder())

    def arrived():
        nonlocal pending
        if pending:
            pending = False
            if inst is not None and not explicit:
                inst.seed()

    class Stdin(io.FileIO):
        # Every read of sys.stdin and sys.stdin.buffer ends in one of these.
        def read(self, size=-1):
            try:
                return super().read(size)
            finally:
                arrived()

        def readall(self):
            try:
                return super().readall()
            finally:
                arrived()

        def readinto(self, b):
            try:
                return super().readinto(b)
            finally:
                arrived()

    old = sys.stdin
    raw = Stdin(0, "rb", closefd=False)
    raw.name = "<stdin>"
    stdin = io.TextIOWrapper(
        io.BufferedReader(raw),
        encoding=old.encoding,
        errors=old.errors,
        newline="\n",
        line_buffering=old.line_buffering,
    )
    stdin.mode = "r"
    sys.stdin = sys.__stdin__ = stdin

    # 2. A quick exit. Tearing the interpreter down (every module, a last garbage
    # collection) takes longer than a small function's own work under an interpreted
    # engine, and nothing can see it: the VM is discarded (or reset) after the response.
    # What a caller can see is kept: threads joined, atexit callbacks run (also
    # weakref.finalize's), stdout and stderr flushed (status 120 if stdout cannot be, as
    # CPython), then the status, as CPython computes it.
    def finish(status):
        threading = sys.modules.get("threading")
        if threading is not None:
            threading._shutdown()
        atexit._run_exitfuncs()
        for name in ("stdout", "stderr"):
            for f in (getattr(sys, name, None), getattr(sys, "__%s__" % name, None)):
                try:
                    if f is not None:
                        f.flush()
                except Exception as e:
                    if name == "stdout":
                        status = 120
                        print("Exception ignored on flushing sys.stdout:", e, file=sys.stderr)
        os._exit(status)

    def exit_status(e):
        # As CPython's handling of an uncaught SystemExit (None if it must do it itself).
        code = e.code
        if code is None:
            return 0
        if isinstance(code, int):
            return int(code) if -(2**31) <= code < 2**31 else None
        try:
            print(code, file=sys.stderr)
        except Exception:
            pass
        return 1

    def report(e, tb):
        # As CPython reports an uncaught exception (sys.excepthook), without this runner's
        # frames: the hook prints the exception's own traceback.
        e.__traceback__ = tb
        sys.excepthook(type(e), e, tb)
        finish(1)

    # sys.argv, sys.path[0] and __main__ as for `python SCRIPT ARGS...`.
    del sys.argv[0]
    script = sys.argv[0]
    if script == "-":
        source = stdin.buffer.read()
        filename = "<stdin>"
        sys.path[0] = ""
    else:
        filename = os.path.abspath(script)
        try:
            with open(filename, "rb") as f:
                source = f.read()
        except OSError as e:
            prog = os.path.basename(sys.orig_argv[0]) if sys.orig_argv else "python"
            print(
                f"{prog}: can't open file {filename!r}: [Errno {e.errno}] {e.strerror}",
                file=sys.stderr,
            )
            finish(2)
        sys.path[0] = os.path.dirname(script)

    g = sys.modules["__main__"].__dict__
    g.pop("_vmm_python_runner", None)
    g["__file__"] = filename
    g["__cached__"] = None
    if script != "-":
        g["__loader__"] = sys.modules["_frozen_importlib_external"].SourceFileLoader(
            "__main__", filename
        )
    try:
        code = compile(source, filename, "exec", dont_inherit=True)
    except SyntaxError as e:
        report(e, None)
    del old, raw, source, stdin
    try:
        exec(code, g)
    except SystemExit as e:
        status = exit_status(e)
        if status is None:
            raise
        finish(status)
    except BaseException as e:
        report(e, e.__traceback__.tb_next if e.__traceback__ else None)
    finish(0)


_vmm_python_runner()
