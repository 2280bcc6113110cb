"""The memory's chunk loops in C++ on the CPU (`csrc/chunk_loops.cpp`), built on first use, with the
other CPU hot spots of the memory layer: the chunk coefficients and their gradient
(`csrc/coefficients.cpp`), the causal convolution + SiLU (`csrc/conv_silu.cpp`) and the output gate's
norm and SiLU (`csrc/gated_output.cpp`). Each has an eager PyTorch twin that stays its reference.

Eager PyTorch runs each of the chunk step's several hundred small operations over all B x H memories
at once, split across the threads, with a Python call and a thread barrier each time; on a CPU with
few cores that overhead, not the matrix products, set the step's time. The C++ loops give each
(batch, head) memory to one thread for a whole stretch of chunks, on 2-D tensors that stay in cache,
with no Python in between. Same equations as `chunked._forward_stretch` / `_backward_stretch`, whose
eager code stays the reference for them (tests compare both with the token loop in float64) and
runs what the C++ does not cover: CUDA tensors, the inner-gradient clamp, forgetting towards the
initial weights, a compiled or graphed chunk step.

The extension is compiled once per machine and PyTorch version with torch.utils.cpp_extension (about
a minute; cached under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions). Without a C++
compiler, or with TITANS_NATIVE=0 in the environment, the eager loops run instead (the first failure
is reported once as a warning).
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

# the chunk loops, their coefficients, and the layer's causal convolution + SiLU (conv.py) and output
# gate (layer._GatedOutput)
SOURCES = [Path(__file__).with_name("csrc") / name
           for name in ("chunk_loops.cpp", "coefficients.cpp", "conv_silu.cpp", "gated_output.cpp")]
HEADERS = [SOURCES[0].with_name("rows.h")]
# -fopenmp: at::parallel_for is a header template; without it the memories run one by one.
# -march=native on x86-64 (the build is this machine's own): the convolution's loops run 1.5-1.8x faster
# with AVX2/AVX-512 than with the baseline SSE2.
X86 = platform.machine().lower() in ("x86_64", "amd64")
CFLAGS = ["-O3", "-fopenmp"] + (["-march=native"] if X86 else [])
_STATE: dict = {"enabled": os.environ.get("TITANS_NATIVE", "1") != "0", "module": None, "error": None}


def _cpu_flags() -> bytes:
    """The CPU's feature flags (Linux), so that a build for one CPU is not loaded on another."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return b""


def native_chunks(enabled: bool = True) -> None:
    """Run the memory's CPU chunk loops (and the layer's other C++ pieces: coefficients, convolution,
    output gate) in C++ (the default, when it builds) or, with False, as eager PyTorch. Process-wide;
    results agree to rounding."""
    _STATE["enabled"] = bool(enabled)


def chunks_native() -> bool:
    """Whether CPU chunk loops run in C++: enabled and built (this builds it if needed)."""
    return _STATE["enabled"] and module() is not None


def module():
    """The compiled extension, or None (disabled, or the build failed: warned once)."""
    if not _STATE["enabled"]:
        return None
    if _STATE["module"] is None and _STATE["error"] is None:
        try:
            from torch.utils.cpp_extension import load

            # named by the hash of the sources, their folder, the flags and the CPU: other versions and
            # other checkouts (a git worktree, an A/B run: the build's commands name the source paths, so
            # one name for two folders would rebuild at each switch) and other machines sharing the cache
            # keep their own builds
            key = b"".join(s.read_bytes() for s in SOURCES + HEADERS) + " ".join(CFLAGS).encode()
            key += str(SOURCES[0].parent.resolve()).encode() + _cpu_flags()
            digest = hashlib.sha1(key).hexdigest()[:12]
            _STATE["module"] = load(name=f"titans_chunk_loops_{digest}", sources=[str(s) for s in SOURCES],
                                    verbose=False, extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"])
        except Exception as err:  # noqa: BLE001 -- any build failure falls back to the eager loops
            _STATE["error"] = err
            warnings.warn(f"titans: the C++ extension did not build ({type(err).__name__}: "
                          f"...{str(err).strip()[-800:]}); the memory layer runs its eager PyTorch loops "
                          "instead (same results, slower on the CPU). Set TITANS_NATIVE=0 to skip the build.",
                          RuntimeWarning, stacklevel=3)
    return _STATE["module"]


def for_tensor(x: torch.Tensor) -> object | None:
    """The extension when it can take x (a CPU float32/float64 tensor, no tracing), else None. Under a
    Python dispatch mode (FlopCounterMode, fake tensors) the eager code runs, so that the mode sees
    every operation: the C++ loops run most of theirs on worker threads, which a mode does not reach."""
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)
            or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None):
        return None
    return module()


def for_stretch(q: torch.Tensor, clip, W0) -> object | None:
    """The extension when it can run this stretch of chunks: `for_tensor(q)`, no clamp, no W0 anchor."""
    return None if clip is not None or W0 else for_tensor(q)
