"""Build and load the native kernels (`kernels.c`): compiled once per machine with the system C compiler, in well
under a second, into a cache directory, and loaded with ctypes.

Why not `torch.utils.cpp_extension`: the kernels need nothing of torch's (they take raw pointers to contiguous
rows), and building against torch's headers costs about a minute of compilation per machine plus ninja, paid by
the first chat. A C99 file and `cc` cost half a second, and the library is found again by the hash of its source,
flags and compiler, so an edit or a new compiler builds afresh and nothing stale is ever loaded.

`load()` returns the library or raises `NativeUnavailable` saying why (no compiler, a failed build); the "auto"
kernel backend then stays on the pure-torch "cpu" backend.

The library is built with OpenMP (`-fopenmp`) so that its row loops can use torch's thread pool, and without it
where the compiler cannot (a clang without libomp): that build runs on one thread and computes the same bits.
Whether the loops may split is decided at load (`_open`): only when torch's OpenMP runtime is the only one mapped
before and after the library is loaded, whose loops then share torch's threads (as many as `torch.set_num_threads`
says). Two runtimes would each keep a pool of spinning threads and fight over the cores.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.c")
CACHE_ENV_VAR = "DSV4_NATIVE_CACHE"
# -ffp-contract=off: no fused multiply-adds, so the rounding is the source's on every CPU; -fno-math-errno lets
# rintf / fabsf compile to single instructions (and the loops vectorise)
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=c99", "-shared", "-fPIC")
OPENMP = "-fopenmp"
# the file names of OpenMP runtimes (GNU, LLVM, Intel) as /proc/self/maps shows them
_OPENMP_RUNTIMES = ("libgomp", "libomp", "libiomp")

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float
_INT = ctypes.c_int
SIGNATURES = {
    "dsv4_block_simulate": (_INT, [_P, _P, _INT, _I, _I, _I, _INT]),
    "dsv4_quantised_linear": (_INT, [_P, _P, _INT, _I, _P, _P, _I, _I, _I, _I]),
    "dsv4_swiglu": (_INT, [_P, _P, _INT, _I, _P, _P, _P, _F]),
    "dsv4_routed_experts": (_INT, [_P, _P, _INT, _I, _I, _P, _P, _I, _P, _P, _F]),
    "dsv4_sinkhorn": (_INT, [_P, _I, _I, _I, _F]),
    "dsv4_hc_split": (_INT, [_P, _P, _P, _I, _I, _P, _P, _P]),
    "dsv4_hc_split_finish": (_INT, [_P, _P, _P, _I, _I, _I, _F]),
    "dsv4_sinkhorn_backward": (_INT, [_P, _P, _P, _I, _I, _I, _F]),
    "dsv4_hadamard": (_INT, [_P, _P, _INT, _I, _I, _F]),
    "dsv4_index_topk": (_INT, [_P, _INT, _I, _I, _P, _I, _P, _P]),
    "dsv4_rms_norm": (_INT, [_P, _P, _INT, _I, _I, _P, _F, _INT, _P]),
    "dsv4_rms_norm_rope": (_INT, [_P, _P, _INT, _I, _I, _P, _F, _INT, _I, _P, _P, _I]),
    "dsv4_rms_norm_backward": (_INT, [_P, _P, _P, _P, _P, _P, _I, _I]),
    "dsv4_swiglu_backward": (_INT, [_P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _F]),
    "dsv4_rms_factor": (_INT, [_P, _P, _INT, _I, _I, _F, _INT]),
    "dsv4_hc_post": (_INT, [_P, _P, _P, _INT, _I, _I, _I, _P, _P]),
    "dsv4_hc_collapse": (_INT, [_P, _P, _P, _INT, _I, _I, _I]),
    "dsv4_hc_post_backward": (_INT, [_P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I]),
    "dsv4_hc_collapse_backward": (_INT, [_P, _P, _P, _P, _P, _I, _I, _I]),
    "dsv4_rope": (_INT, [_P, _P, _INT, _I, _I, _I, _P, _P, _I, _INT]),
    "dsv4_sparse_attn": (_INT, [_P, _P, _INT, _I, _I, _I, _I, _P, _I, _INT, _P, _I, _P, _F]),
    "dsv4_attn_rows": (_I, [_P, _I, _I, _I, _I, _I, _I, _P, _P]),
    "dsv4_attn_logits": (_INT, [_P, _P, _I, _I, _I, _P, _F, _F, _P]),
    "dsv4_attn_weights": (_INT, [_P, _P, _I, _I, _I, _P, _P, _P]),
    "dsv4_attn_block_exponents": (_INT, [_P, _P, _I, _I, _I, _I, _F, _P, _P, _P]),
    "dsv4_attn_block_probs": (_INT, [_P, _I, _I, _I, _I, _INT, _INT, _P, _P, _P]),
    "dsv4_attn_slot_rows": (_I, [_P, _I, _I, _I, _I, _I, _I, _P, _P]),
    "dsv4_attn_pick": (_INT, [_P, _P, _I, _I, _I, _I, _I, _P]),
    "dsv4_share_threads": (_INT, [_INT]),
    "dsv4_panel_gemm": (_INT, [_P, _I, _I, _P, _I, _P]),
    "dsv4_chunk_attn": (_INT, [_P, _P, _I, _P, _P, _I, _I, _I, _I, _I, _I, _F, _F, _P]),
    "dsv4_moe_gate": (_INT, [_P, _I, _I, _P, _I, _P, _P, _INT, _I, _F, _P, _P, _P]),
    "dsv4_gated_pool": (_INT, [_P, _P, _I, _I, _P, _I, _I, _P]),
    "dsv4_swiglu_act": (_INT, [_P, _P, _P, _I, _I, _F]),
    "dsv4_exp": (_INT, [_P, _P, _I]),
    "dsv4_hc_pre": (_INT, [_P, _I, _I, _I, _P, _P, _P, _I, _F, _F, _P, _P, _P]),
    "dsv4_head_greedy": (_INT, [_P, _I, _I, _P, _P, _P, _P, _P, _F, _P, _I, _I, _P]),
    "dsv4_panel_experts": (_INT, [_P, _INT, _INT, _P, _I, _I, _P, _P, _I, _P, _I, _I, _F]),
    "dsv4_attn_block_values": (_INT, [_P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _P]),
    "dsv4_rounded_attn_args": (_INT, [_P, _INT, _I, _I, _I, _I, _P, _I, _P, _I, _P, _P, _F, _INT, _P, _P]),
    "dsv4_rounded_attn_out": (_INT, [_P, _P, _I, _I, _I, _I, _P, _I, _P, _I, _INT, _INT, _P, _INT]),
}


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be built or loaded here (the message says why)."""


def cache_dir() -> Path:
    """Where built libraries are kept: $DSV4_NATIVE_CACHE, else $XDG_CACHE_HOME/dsv4/native (~/.cache/...)."""
    chosen = os.environ.get(CACHE_ENV_VAR)
    if chosen:
        return Path(chosen)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsv4" / "native"


def compiler() -> str:
    """The C compiler: $CC, else the first of cc, gcc, clang on the PATH (NativeUnavailable if none)."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise NativeUnavailable("no C compiler found (set CC, or install gcc) to build dsv4's native CPU kernels")


def _compiler_identity(cc: str) -> str:
    """The compiler as the cache key knows it: its resolved path with the size and time of the file, read without
    running it. A process that loads the kernels (every rank of a torchrun) starts no child: forking one beside
    the threads of an initialised process group made a rank abort at exit now and then."""
    path = os.path.realpath(shutil.which(cc) or cc)
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise NativeUnavailable(f"the C compiler {cc!r} cannot be found: {exc}") from exc
    return f"{path} {stat.st_size} {stat.st_mtime_ns}"


def library_path(cc: str, flags: tuple[str, ...] = (*FLAGS, OPENMP)) -> Path:
    """The cache path of the library built from this source with these flags by this compiler on this machine."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(flags).encode(), _compiler_identity(cc).encode(),
                 platform.machine().encode(), _cpu_model().encode()):
        key.update(part)
    return cache_dir() / f"dsv4_kernels_{key.hexdigest()[:16]}.so"


def _cpu_model() -> str:
    """The CPU's model line: -march=native code built on one CPU may not run on another (a shared home)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def build(cc: str | None = None) -> Path:
    """The built library's path, compiling it first if the cache lacks it: with OpenMP, else (the compiler refused
    `-fopenmp`; remembered beside the cache, so it is asked once) without."""
    cc = cc or compiler()
    with_openmp = library_path(cc)
    refused = with_openmp.with_suffix(".no-openmp")
    if refused.exists():
        return _compile(cc, FLAGS, library_path(cc, FLAGS))
    try:
        return _compile(cc, (*FLAGS, OPENMP), with_openmp)
    except NativeUnavailable as exc:
        without = _compile(cc, FLAGS, library_path(cc, FLAGS))  # a failure here is the source's or the compiler's
        logging.getLogger(__name__).info("%s\nbuilt dsv4's native kernels without OpenMP (one thread)", exc)
        with contextlib.suppress(OSError):  # only OpenMP was refused: remember it
            refused.write_text(str(exc))
        return without


def _compile(cc: str, flags: tuple[str, ...], target: Path) -> Path:
    """`target`, compiled from the source with `flags` if it does not exist yet (atomically: concurrent builders
    each write their own file and rename it into place)."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            raise NativeUnavailable(f"building dsv4's native kernels with {cc} failed:\n{result.stderr.strip()}")
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"building dsv4's native kernels with {cc} failed: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def openmp_runtimes(maps: str | None = None) -> set[str]:
    """The OpenMP runtime files mapped in this process (from /proc/self/maps, or the `maps` text given); empty
    where the file cannot be read."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return set()
    found = set()
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address, perms, offset, dev, inode, path (absent for anonymous maps)
        if len(fields) == 6 and Path(fields[5]).name.startswith(_OPENMP_RUNTIMES):
            found.add(fields[5])
    return found


_loaded: ctypes.CDLL | NativeUnavailable | None = None
_warned = False


def load() -> ctypes.CDLL:
    """The native kernels, built if needed. Tried once per process: a failure is remembered and raised again
    (NativeUnavailable), so a machine without a compiler pays for one attempt."""
    global _loaded
    if _loaded is None:
        try:
            _loaded = _open(build())
        except NativeUnavailable as exc:
            _loaded = exc
    if isinstance(_loaded, NativeUnavailable):
        raise _loaded
    return _loaded


def _open(path: Path) -> ctypes.CDLL:
    """The library at `path`, its functions typed, its loops allowed to split between threads where it shares
    torch's OpenMP runtime (`lib.splits_rows`)."""
    torchs = openmp_runtimes()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise NativeUnavailable(f"loading {path} failed: {exc}") from exc
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    shared = len(torchs) == 1 and openmp_runtimes() == torchs
    # dsv4_share_threads answers 0 where the library was built without OpenMP
    lib.splits_rows = shared and lib.dsv4_share_threads(1) > 0
    return lib


def available() -> bool:
    """Whether `load()` succeeds (the "auto" backend's test; the first failure is logged with its reason)."""
    global _warned
    try:
        load()
    except NativeUnavailable as exc:
        if not _warned:
            _warned = True
            logging.getLogger(__name__).warning("%s\nthe kernels stay on the pure-torch 'cpu' backend", exc)
        return False
    return True
