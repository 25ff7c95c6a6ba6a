"""Memory sizes at the runner's edges: people read and write GiB (2**30 bytes) in job keys (`*_gib`),
hardware profiles, messages and plans; the code and the CSV columns (`*_bytes`) count bytes. This is
the one place the two meet. (Bandwidths are rates in GB/s, 10**9 bytes per second, named `*_gbps`.)

No runner imports: every layer may use it.
"""
from __future__ import annotations

GIB = 2 ** 30


def gib_to_bytes(gib: float) -> float:
    """A size stated in GiB, in bytes (not rounded: budgets that must be whole bytes floor it)."""
    return gib * GIB


def bytes_to_gib(nbytes: float) -> float:
    return nbytes / GIB


def format_gib(nbytes: float, digits: int = 2) -> str:
    """Bytes as GiB for messages: 1.5 * 2**30 -> '1.50 GiB'."""
    return f"{bytes_to_gib(nbytes):.{digits}f} GiB"


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB': the largest binary unit that fits, for sizes from bytes to GiB."""
    for unit, size in (("GiB", GIB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
