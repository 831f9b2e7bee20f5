"""Stage names -> the ordered stages to run (sample stages first, each after the stages it requires).

The one module that imports the shipped stage modules (they register themselves on import), kept out
of :mod:`clipforge.curate.registry` so that no stage module imports a module that imports it back.
"""

from __future__ import annotations

from clipforge.curate.registry import STAGES, Stage


def load_builtin_stages() -> dict[str, Stage]:
    """Import the modules that register the shipped stages (kept lazy so ``--help`` stays fast)."""
    from clipforge.curate import balance, clipscore, copystage, dedup, image, safety, text  # noqa: F401

    return STAGES


def resolve_stages(names: list[str]) -> list[Stage]:
    """Validate names, add required stages, and order them so requirements run first."""
    stages = load_builtin_stages()
    unknown = [n for n in names if n not in stages]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; available: {sorted(stages)}")
    order: list[str] = []

    def visit(n: str) -> None:
        if n in order:
            return
        for r in stages[n].requires:
            visit(r)
        order.append(n)

    for n in names:
        visit(n)
    samples = [stages[n] for n in order if stages[n].kind == "sample"]
    globs = [stages[n] for n in order if stages[n].kind == "global"]
    return samples + globs
