"""Record the Triton launches a run under the interpreter makes, as a Hopper launch would specialise them, for
`triton_hopper_build.py --from FILE` to build: the variants a real workload reaches (the demo model, a preset's
engine, a training step), which the build script's own calls may miss.

    DSV4_RECORD_LAUNCHES=/tmp/launches.pkl python -m pytest -q tests/test_triton_backend.py
    TRITON_INTERPRET=0 python tests/triton_hopper_build.py --from /tmp/launches.pkl [--resources]

`tests/conftest.py` installs the recorder when the variable is set (runs add to the file's launches).
"""

from __future__ import annotations

import atexit
import pickle
from pathlib import Path

HOPPER_ARCH = 90


def install(path: str) -> None:
    """Record every interpreted launch of this process into `path` (read first, written at exit)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", HOPPER_ARCH, 32))
    file = Path(path)
    launches: dict[tuple, tuple] = pickle.loads(file.read_bytes()) if file.exists() else {}
    binders: dict = {}
    run = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        if self.fn not in binders:
            jitted = JITFunction(self.fn, **self.kwargs)
            binders[self.fn] = jitted, create_function_from_signature(jitted.signature, jitted.params, backend)
        jitted, binder = binders[self.fn]
        bound, specialization, options = binder(*args, **kwargs)
        key = (self.fn.__module__, self.fn.__qualname__, str(specialization), str(options))
        if key not in launches:
            launches[key] = jitted._pack_args(backend, kwargs, bound, specialization, options)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording
    atexit.register(lambda: file.write_bytes(pickle.dumps(launches)))
