"""Timing bounds the nested tests assert, with what each run measured (printed in pytest's
terminal summary): a bound met by a thin margin on one host shows before it fails on a slower
one."""

from __future__ import annotations

MEASURED: list[str] = []


def within(what: str, measured: float, bound: float, unit: str = "s") -> bool:
    """Whether `measured` <= `bound`; remembered for the summary either way."""
    ok = measured <= bound
    MEASURED.append(
        f"{what}: {measured:g} {unit} of <= {bound:g} {unit} ({measured / bound:.0%}){'' if ok else ' FAILED'}"
    )
    return ok
