"""What a sweep's design can decide, before any run: ``goldenpath sweep --plan SWEEP_CONFIG``.

The verdict of ``goldenpath compare`` is fixed by the sweep alone (:mod:`goldenpath.comparison.verdicts`): per
regime, the reference (its least-noisy setting), the family (every other grid setting of the regime, at every
non-trivial target), the seeds and their design. So is the smallest family-wise p-value it can reach: the
smallest permutation p the seeds allow (a count of relabellings) times the family's targets, and never below
the smallest p of one setting against the reference (a setting's adjusted p is floored there). Where that is
not below 0.05 no outcome of the runs can make a setting "differ"; the plan says so and how many seeds
would do (the answer of compare then says "cannot be decided", never "no setting differs").
"""

from __future__ import annotations

import math

from goldenpath.comparison import verdicts

from goldenpath.comparison.design import Design, smallest_p

ALPHA = verdicts.ALPHA


def smallest_adjusted(settings: int, seeds: int, targets: int, design: str, *, n_perm: int = 2000) -> float:
    """The smallest adjusted p of a family of ``settings`` settings plus the reference with ``seeds`` seeds
    each over ``targets`` targets: Bonferroni over targets of the min-P test, and never below a setting's
    pairwise p against the reference (as :func:`goldenpath.comparison.verdicts.adjust` floors it)."""
    if settings < 1 or seeds < 2 or targets < 1:
        return math.nan
    groups = tuple(tuple(range(k * seeds, (k + 1) * seeds)) for k in range(settings + 1))
    ids = tuple(i % seeds if design == "paired" else i for i in range(seeds * (settings + 1)))
    p = smallest_p(Design(groups, ids), list(range(settings + 1)), n_perm=n_perm)
    pair = smallest_p(Design(groups, ids), [0, 1], n_perm=n_perm)
    return min(1.0, max(targets * p, pair))


def seeds_needed(settings: int, targets: int, design: str, *, start: int = 2, limit: int = 64) -> int | None:
    """The fewest seeds per setting whose smallest adjusted p is below :data:`ALPHA` (None past ``limit``)."""
    for n in range(max(2, start), limit + 1):
        if smallest_adjusted(settings, n, targets, design) < ALPHA:
            return n
    return None


def plan(sweep) -> list[str]:
    """Lines that say, per regime, the reference, the family, the seeds and the smallest adjusted p the
    design can reach, with a warning where it cannot reach :data:`ALPHA` (``sweep``: a loaded Sweep)."""
    from goldenpath.comparison.runs import settings_of
    from goldenpath.config import load_config
    from goldenpath.data.baselines import trivial_loss
    from goldenpath.config.grid import expand

    points = [p for p in expand(sweep) if p.fork is None]
    first_rep = sweep.seeds[0]
    configs = {p.name: load_config(sweep.base, p.overrides) for p in points if p.knobs["replicate"] == first_rep}
    if not configs:
        return []
    infos = settings_of(configs, {n: None for n in configs})
    settings = list(dict.fromkeys(i.setting for i in infos.values()))
    config = next(iter(configs.values()))
    baseline, what = trivial_loss(config.data)
    targets = list(config.checkpoint.targets)
    trivial = [t for t in targets if t >= baseline]
    kept = len(targets) - len(trivial)
    n = len(sweep.seeds)
    lines = [f"seeds: {n} per setting, {sweep.design} design"
             + (" (every setting its own seeds)" if sweep.design == "independent" else
                " (the same seeds in every setting, analysed within seeds)")
             + f"; trivial loss {baseline:.3g} ({what})"
             + (f": target{'s' if len(trivial) > 1 else ''} {', '.join(f'{t:g}' for t in trivial)} at or above it "
                "will be flagged trivial and left out of the verdicts" if trivial else "")]
    for regime in ("online", "offline"):
        mine = [s for s in settings if s.regime == regime]
        if not mine:
            continue
        ref = min(mine, key=lambda s: s.order)
        family = len(mine) - 1
        if family < 1:
            lines.append(f"{regime}: one setting ({ref.label}): no family to test")
            continue
        p = smallest_adjusted(family, n, kept, sweep.design)
        line = (f"{regime}: reference {ref.label}; family of {family} setting{'s' if family > 1 else ''} x {kept} "
                f"target{'s' if kept != 1 else ''}; the smallest adjusted p this design can reach is {p:.2g}")
        if not p < ALPHA:
            need = seeds_needed(family, kept, sweep.design, start=n + 1)
            line += (f" - it cannot decide at {ALPHA:g}: use {need} seeds per setting" if need else
                     f" - it cannot decide at {ALPHA:g} with any number of seeds up to 64")
        lines.append(line)
    return lines
