"""What this machine's hardware does fast: the precision `mixed_precision: auto` resolves to, the
matrix-product peak it reaches, and the FLOPs a piece of work costs (to say how far from that
peak the kit runs).

bf16 pays only where the hardware multiplies in bf16: Intel AMX or AVX512-BF16 on a CPU, or a GPU
that supports it. Elsewhere torch emulates it: on an AVX2-only CPU (e.g. AMD EPYC Milan) a bf16
forward and backward of e5-small measured about 10x slower than float32, so `auto` picks float32
there.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, TypeVar

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")
PRECISION_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has bf16 matrix instructions (AMX tiles or AVX512-BF16)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(setting: str, device_type: str | None = None) -> str:
    """`setting` unless it is "auto": then bf16 on a GPU that supports it (else fp16), bf16 on a
    CPU with bf16 matrix instructions, and "no" (float32) on any other CPU."""
    if setting != "auto":
        return setting
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        # not counting emulation: on a V100 or T4 bf16 is emulated and fp16 is the fast path
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if device_type == "cpu" and cpu_has_fast_bf16() else "no"


def attention_kernel(setting: str, device_type: str, precision: str) -> contextlib.AbstractContextManager:
    """The scaled-dot-product attention kernels a training step may use, as a context to run it in.

    "auto" is the math kernel (plain matrix products and a softmax) on a CPU in bf16, and torch's
    own pick elsewhere. On a CPU with AMX, torch picks its fused flash kernel when attention has
    no dropout, and that kernel's bf16 backward took 0.19 s of a 0.76 s e5-small step; the math
    kernel ran the step 1.29x faster (benchmarks/results/step_experiments.md). In float32 the
    two measured within 2%; on a GPU the fused kernels are the fast ones.
    "math" forces the math kernel anywhere; "torch" leaves the choice to torch.
    """
    if setting == "math" or (setting == "auto" and device_type == "cpu" and precision == "bf16"):
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_second(m: int, k: int, n: int, *, dtype: torch.dtype = torch.float32,
                            device: str | torch.device = "cpu", seconds: float = 0.3) -> float:
    """The best FLOP/s of an (m x k) @ (k x n) product over repeats filling about `seconds`."""
    device = torch.device(device)
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    a @ b  # warm-up: kernels chosen, memory touched
    _synchronize(device)
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        started = time.perf_counter()
        a @ b
        _synchronize(device)
        elapsed = time.perf_counter() - started
        best, spent = min(best, elapsed), spent + elapsed
    return 2 * m * k * n / best


def matmul_peak(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *,
                size: int | None = None, seconds: float = 0.3) -> float:
    """This machine's matrix-product FLOP/s in `dtype`: the best square product of `size` (default
    2048 on a CPU, 8192 on a GPU). Emulated half precisions (bf16 on a CPU without AMX or
    AVX512-BF16: about 1 GFLOP/s) are measured at 256, where a 2048 product takes many seconds."""
    device = torch.device(device)
    emulated = device.type == "cpu" and dtype != torch.float32 and not cpu_has_fast_bf16()
    size = size or (256 if emulated else 8192 if device.type == "cuda" else 2048)
    return matmul_flops_per_second(size, size, size, dtype=dtype, device=device, seconds=seconds)


def count_flops(work: Callable[[], T]) -> tuple[T, int]:
    """`work()`'s result and the FLOPs torch's operators count while it runs (matrix products,
    attention, convolutions: what `torch.utils.flop_counter` knows; element-wise work is not counted)."""
    counter = FlopCounterMode(display=False)
    with counter:
        result = work()
    return result, int(counter.get_total_flops())


class ThroughputMeter:
    """Training rows/s and model FLOP/s over the steps since the last report, and the fraction of
    the matrix-product peak measured for the run's precision (`matmul_peak`: a 2048 square on a
    CPU); FLOPs counted on one step, per padded token.

    An observer of the training loop, outside the step: the loop runs each step inside
    `watching()` and then calls `step_done(tokens)`; the log line calls `report()`.
    """

    def __init__(self, rows_per_step: int, peak: float | None):
        self.rows_per_step, self.peak = rows_per_step, peak
        self.flops_per_token: float | None = None
        self.steps = self.tokens = 0
        self.seconds = 0.0
        self._watched: tuple[str, float] | None = None  # the step just watched: ("flops", n) or ("seconds", s)

    @contextlib.contextmanager
    def watching(self):
        """Around one training step: its seconds; or, while FLOPs per token are still to count and
        there is a peak to compare against, its FLOPs (the counter slows its step: counted, not timed)."""
        if self.peak and self.flops_per_token is None:
            counter = FlopCounterMode(display=False)
            with counter:
                yield
            self._watched = ("flops", int(counter.get_total_flops()))
        else:
            started = time.perf_counter()
            yield
            self._watched = ("seconds", time.perf_counter() - started)

    def step_done(self, tokens: int) -> None:
        """The step just watched ran `tokens` padded tokens: its FLOPs per token or its seconds recorded."""
        (kind, value), self._watched = self._watched, None
        if kind == "flops":
            self.count(int(value), tokens)
        else:
            self.add(value, tokens)

    def count(self, flops: int, tokens: int) -> None:
        """A step's counted FLOPs and padded tokens (that step is not timed: counting slows it)."""
        if tokens:
            self.flops_per_token = flops / tokens

    def add(self, seconds: float, tokens: int) -> None:
        self.steps, self.tokens, self.seconds = self.steps + 1, self.tokens + tokens, self.seconds + seconds

    def report(self) -> dict[str, float]:
        """`samples_per_second` and, once counted, `model_flops_per_second` and `fraction_of_peak`;
        then starts a new interval."""
        if not self.seconds:
            return {}
        figures = {"samples_per_second": self.steps * self.rows_per_step / self.seconds}
        if self.flops_per_token is not None:
            figures["model_flops_per_second"] = self.flops_per_token * self.tokens / self.seconds
            if self.peak:
                figures["fraction_of_peak"] = figures["model_flops_per_second"] / self.peak
        self.steps = self.tokens = 0
        self.seconds = 0.0
        return figures
