"""Byte sizes as people write them ('2GB', '16GiB', '500M') and as we print them."""

from __future__ import annotations

import re

from bayling.errors import BaylingError

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?)(i?)(b?)\s*", re.IGNORECASE)


def parse_size(text: str | int, *, bare_unit_base: int = 1000, what: str = "size",
               examples: str = "2GB, 500MB, 1GiB, 1048576") -> int:
    """'2GB' -> 2*10**9, '2GiB' -> 2*2**30, '1234' -> 1234.

    A unit without B ('24G') is ambiguous: Hugging Face's shard sizes read it as decimal
    (the default), nvidia-smi's memory figures as binary (`bare_unit_base=1024`).
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise BaylingError(f"a {what} cannot be negative: {text}")
        return text
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise BaylingError(f"cannot read {text!r} as a {what} (examples: {examples})")
    value, prefix, binary, b = float(m.group(1)), m.group(2).lower(), m.group(3), m.group(4)
    if not prefix:
        if binary:
            raise BaylingError(f"cannot read {text!r} as a {what} (examples: {examples})")
        return int(value)
    base = 1024 if binary else (1000 if b else bare_unit_base)
    return int(value * base ** ("kmgtp".index(prefix) + 1))


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")
