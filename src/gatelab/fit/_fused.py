"""Loader of the fused E-step (``_fused.c``): compiled with the system's C compiler on
first use into a per-user cache, then called through ctypes. Where no compiler is found
(or ``GATELAB_FUSED=0``), ``load()`` returns None and EM uses its pure-PyTorch kernel,
which computes the same statistics (the tests check that both agree)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["load", "estep"]

_SOURCE = Path(__file__).with_name("_fused.c")
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet


def _cache_dir() -> Path:
    root = os.environ.get("GATELAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gatelab")
    return Path(root)


def _cpu_flags() -> bytes:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return b""
    return next((line for line in lines if line.startswith("flags")), "").encode()


# -ffast-math stays: without it gcc calls no vector exp/log (glibc declares them under
# __FAST_MATH__ only), and over-specified fits ran 2.1x slower here (40 replicates x 5
# starts, k = 3, SQUAREM: 3.4 s against 7.3 s with -fno-finite-math-only added, 7.8 s with
# only -fno-math-errno -fno-trapping-math). Its danger, NaN checks folded away, is met in
# the source: the guards read the bits (finite_bits in _fused.c). GATELAB_CFLAGS overrides.
_FLAGS = os.environ.get("GATELAB_CFLAGS", "-O3 -march=native -ffast-math -fopenmp -fPIC").split()


def _compile(target: Path) -> None:
    """Compile to a temporary name, then rename, so that concurrent workers never load a
    half-written library. -ffast-math is used to compile only, not to link: linking with
    it would switch the whole process to flush-denormals-to-zero. -fopenmp links
    libgomp.so.1, and torch has loaded its own libgomp.so.1 by then: the loader reuses
    that one, so the kernel and torch share one OpenMP runtime and one pool of threads
    (tests/test_threads.py checks it), rather than two pools spinning against each other."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise OSError("no C compiler")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / "fused.o", Path(tmp) / "fused.so"
        subprocess.run([cc, *_FLAGS, "-c", str(_SOURCE), "-o", str(obj)], check=True,
                       capture_output=True)
        subprocess.run([cc, "-shared", "-fopenmp", str(obj), "-o", str(lib), "-lm"],
                       check=True, capture_output=True)
        os.replace(lib, target)


def load() -> ctypes.CDLL | None:
    """The compiled library, or None where it cannot be built or is switched off."""
    global _lib
    if _lib is False:
        _lib = None
        if os.environ.get("GATELAB_FUSED", "1") != "0":
            # -march=native: the library is built for this CPU, so its flags key the cache.
            digest = hashlib.sha256(_SOURCE.read_bytes() + _cpu_flags()
                                    + " ".join(_FLAGS).encode()).hexdigest()[:16]
            target = _cache_dir() / f"fused-{digest}-{os.uname().machine}.so"
            try:
                if not target.exists():
                    _compile(target)
                lib = ctypes.CDLL(str(target))
                lib.gatelab_estep.restype = ctypes.c_int
                _lib = lib
            except subprocess.CalledProcessError as err:
                # A compiler that rejects the source is a bug to report, not a quiet
                # fall-back: say so once, with the compiler's own words.
                warnings.warn(f"gatelab: compiling {_SOURCE.name} failed, so EM uses its "
                              f"PyTorch kernel (same results, slower). Compiler said:\n"
                              f"{err.stderr.decode(errors='replace')[-2000:]}", RuntimeWarning,
                              stacklevel=2)
            except OSError:
                pass  # no compiler, or a library that will not load: the PyTorch kernel
    return _lib if isinstance(_lib, ctypes.CDLL) else None


def _loaded() -> ctypes.CDLL:
    """The library, for callers that checked ``load()`` first."""
    lib = load()
    if lib is None:
        raise RuntimeError("The fused C kernel is not available (GATELAB_FUSED=0 or no compiler).")
    return lib


def _check_code(code: int, e: int) -> None:
    """The C functions' return codes: 1 too many experts, 3 out of memory."""
    if code == 3:
        raise MemoryError("The fused C kernel could not allocate a problem's buffers.")
    if code:
        raise ValueError(f"The fused kernel handles at most 16 experts; got {e}.")


def gate_direction(g_BEP: Tensor, hd_BEPP: Tensor, hc_BEEPP: Tensor) -> Tensor:
    """The C kernel's Newton direction for the gate, (B, E - 1, P), from the statistics
    ``estep`` returns (``gatelab_gate_direction``): for tests against the PyTorch rule."""
    lib = _loaded()
    b, e, p = g_BEP.shape
    args = [t.contiguous().to(torch.float64) for t in (g_BEP, hd_BEPP, hc_BEEPP)]
    d = g_BEP.new_empty(b, e - 1, p, dtype=torch.float64)
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    if lib.gatelab_gate_direction(b, e, p, *map(ptr, args), ptr(d)):
        raise MemoryError("The C gate direction could not allocate its work space.")
    return d


def exp(x: Tensor) -> Tensor:
    """The kernel's own exp (``exp_block`` in ``_fused.c``) of a float64 tensor, for tests."""
    out = x.to(torch.float64).contiguous().clone()
    _loaded().gatelab_exp(out.numel(), ctypes.c_void_p(out.data_ptr()))
    return out


def estep(f_BQN: Tensor, z_BPN: Tensor, y_BN: Tensor, coef_BEQ: Tensor, gate_BEP: Tensor,
          var_BE: Tensor, threads: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(ll (B,), S (B, E, Q*Q+Q+1), G (B, E, P), Hd (B, E, P, P), Hc (B, E, E, P, P)):
    see ``_fused.c``. All inputs float64 and contiguous on the CPU. ``threads``: at most
    this many threads, each taking whole problems (``gatelab._threads.split_threads``)."""
    lib = _loaded()
    b, q, n = f_BQN.shape
    e, p = gate_BEP.shape[1], z_BPN.shape[1]
    args = [t.contiguous() for t in (f_BQN, z_BPN, y_BN, coef_BEQ, gate_BEP, var_BE)]
    ll = f_BQN.new_empty(b)
    s = f_BQN.new_empty(b, e, q * q + q + 1)
    g = f_BQN.new_empty(b, e, p)
    hd = f_BQN.new_empty(b, e, p, p)
    hc = f_BQN.new_empty(b, e, e, p, p)
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    code = lib.gatelab_estep(b, n, e, q, p, threads, *map(ptr, args),
                             *map(ptr, (ll, s, g, hd, hc)))
    _check_code(code, e)
    return ll, s, g, hd, hc


def loglik_derivatives(f_BQN: Tensor, z_BPN: Tensor, y_BN: Tensor, coef_BEQ: Tensor,
                       gate_BEP: Tensor, var_BE: Tensor, want: bool = True,
                       threads: int = 1) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(ll (B,), gradient (B, M), Hessian (B, M, M)) of the log-likelihood (sums over the
    samples) in every parameter, M = E (P + Q + 1): per expert its gate row (P), its
    coefficients (Q) and its log variance (``gatelab_loglik_derivs`` in ``_fused.c``).
    With ``want`` False only ll is computed (the other two are None)."""
    lib = _loaded()
    b, q, n = f_BQN.shape
    e, p = gate_BEP.shape[1], z_BPN.shape[1]
    m = e * (p + q + 1)
    if p + q + 1 > 64:
        raise ValueError(f"The C derivatives take at most 64 parameters per expert; got {p + q + 1} "
                         f"(gate {p}, expert {q}, 1 variance): use the PyTorch closed form.")
    args = [t.contiguous() for t in (f_BQN, z_BPN, y_BN, coef_BEQ, gate_BEP, var_BE)]
    ll = f_BQN.new_empty(b)
    grad = f_BQN.new_empty(b, m) if want else None
    hess = f_BQN.new_empty(b, m, m) if want else None
    ptr = lambda t: ctypes.c_void_p(None if t is None else t.data_ptr())  # noqa: E731
    code = lib.gatelab_loglik_derivs(b, n, e, q, p, threads, *map(ptr, args), int(want),
                                     *map(ptr, (ll, grad, hess)))
    _check_code(code, e)
    return ll, grad, hess


def em(f_BQN: Tensor, z_BPN: Tensor, y_BN: Tensor, floor_B: Tensor, coef_BEQ: Tensor,
       gate_BEP: Tensor, var_BE: Tensor, tol: float, max_iter: int, threads: int = 1):
    """Plain EM to convergence for every problem (``gatelab_em`` in ``_fused.c``): the
    steps of ``_SoftmaxLinearKernel.update`` and ``fit_em``'s stopping rule, in C.
    Returns (coef, gate, var, ll, n_iter, converged, degenerate)."""
    lib = _loaded()
    b, q, n = f_BQN.shape
    e, p = gate_BEP.shape[1], z_BPN.shape[1]
    data = [t.contiguous() for t in (f_BQN, z_BPN, y_BN, floor_B)]
    coef, gate, var = (t.clone().contiguous() for t in (coef_BEQ, gate_BEP, var_BE))
    ll = f_BQN.new_empty(b)
    ints = [torch.zeros(b, dtype=torch.int32) for _ in range(3)]
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    code = lib.gatelab_em(b, n, e, q, p, threads, *map(ptr, data),
                          ctypes.c_double(tol), max_iter, *map(ptr, (coef, gate, var, ll)),
                          *map(ptr, ints))
    _check_code(code, e)
    n_iter, converged, degenerate = ints
    return coef, gate, var, ll, n_iter.long(), converged.bool(), degenerate.bool()


def mstep(f_BQN: Tensor, z_BPN: Tensor, y_BN: Tensor, resp_BNE: Tensor, floor_B: Tensor,
          coef_BEQ: Tensor, gate_BEP: Tensor, var_BE: Tensor, threads: int = 1):
    """One M-step from given responsibilities (``gatelab_mstep``): the steps of ``m_step``
    for the softmax gate with linear experts (WLS, floored variances, one IRLS gate step
    with ``halving_step``'s halving). Returns (coef, gate, var, degenerate)."""
    lib = _loaded()
    b, q, n = f_BQN.shape
    e, p = gate_BEP.shape[1], z_BPN.shape[1]
    data = [t.contiguous() for t in (f_BQN, z_BPN, y_BN, resp_BNE, floor_B)]
    coef, gate, var = (t.clone().contiguous() for t in (coef_BEQ, gate_BEP, var_BE))
    degenerate = torch.zeros(b, dtype=torch.int32)
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    code = lib.gatelab_mstep(b, n, e, q, p, threads, *map(ptr, data),
                             *map(ptr, (coef, gate, var, degenerate)))
    _check_code(code, e)
    return coef, gate, var, degenerate.bool()
