"""What this machine's hardware does fast: the precision `mixed_precision: auto` resolves to.

bf16 pays only where the hardware multiplies in bf16: Intel AMX or AVX512-BF16 on a CPU, or a GPU
that supports it. Elsewhere torch emulates it: on an AVX2-only CPU (e.g. AMD EPYC Milan) a bf16
forward and backward of e5-small measured about 10x slower than float32, so `auto` picks float32
there.
"""

from __future__ import annotations

import torch



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
