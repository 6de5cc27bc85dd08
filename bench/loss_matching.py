"""Loss matching on a finished sweep: how far checkpoints overshoot their targets, and whether their steps
change when the target search evaluates after every step.

    goldenpath demo && python bench/loss_matching.py [--sweep runs/demo/demo] [--runs 8]

1. Every loss-target checkpoint of the sweep: its overshoot (target - eval loss), and the overshoot in units
   of one step's change of the eval loss (eval loss of the step before minus its own). With exact loss
   matching the second is at most 1.
2. ``--runs`` of the sweep's runs (one seed of each setting first) trained again from scratch with
   ``checkpoint.target_eval_every=1`` (every step evaluated: the ground truth of "the first step at or below
   the target"); a checkpoint whose step and eval loss differ from the sweep's is one whose loss dipped below
   its target between two of the search's evals that both lay above it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from goldenpath.store.files import read_json
from goldenpath.config import load_config
from goldenpath.training.trainer import train


def overshoots(sweep: Path) -> list[dict]:
    rows = []
    for meta_path in sorted(sweep.glob("*/checkpoints/target-*/meta.json")):
        m = read_json(meta_path)
        prev = m.get("previous_eval")
        step_change = (prev[1] - m["eval_loss"]) if prev and prev[1] is not None and prev[0] == m["step"] - 1 else None
        rows.append({"run": meta_path.parents[2].name, "target": m["target"], "step": m["step"],
                     "loss": m["eval_loss"], "overshoot": m["target"] - m["eval_loss"],
                     "in_steps": (m["target"] - m["eval_loss"]) / step_change if step_change else None,
                     "replayed": m.get("replayed")})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--sweep", default="runs/demo/demo")
    p.add_argument("--runs", type=int, default=8)
    args = p.parse_args()
    sweep = Path(args.sweep)
    rows = overshoots(sweep)
    over = [r["overshoot"] for r in rows]
    units = [r["in_steps"] for r in rows if r["in_steps"] is not None]
    print(f"{len(rows)} checkpoints: overshoot median {statistics.median(over):.4g}, max {max(over):.4g} "
          f"(relative to target: max {max(r['overshoot'] / r['target'] for r in rows):.2%}); in units of the last "
          f"step's change of the eval loss: median {statistics.median(units):.2f}, max {max(units):.2f} "
          f"({len(units)} with the step before evaluated); {sum(bool(r['replayed']) for r in rows)} located by replay")
    by_setting: dict[str, list[Path]] = {}
    for run in sorted(p.parent for p in sweep.glob("*/config.yaml")):
        by_setting.setdefault(run.name.rsplit("_seed=", 1)[0], []).append(run)
    chosen = [runs[k] for k in range(max(map(len, by_setting.values()))) for runs in by_setting.values()
              if k < len(runs)][: args.runs]
    same = total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for run in chosen:
            config = load_config(run / "config.yaml", [f"out={tmp}", "checkpoint.target_eval_every=1",
                                                        "checkpoint.eval_min_every=1"])
            fine = train(config)
            for meta_path in sorted(run.glob("checkpoints/target-*/meta.json")):
                a, b = read_json(meta_path), read_json(fine / "checkpoints" / meta_path.parent.name / "meta.json")
                total += 1
                same += (a["step"], a["eval_loss"]) == (b["step"], b["eval_loss"])
                if (a["step"], a["eval_loss"]) != (b["step"], b["eval_loss"]):
                    print(f"  {run.name} {meta_path.parent.name}: step {a['step']} (evaluated after every step: "
                          f"step {b['step']})")
    print(f"eval after every step: {same} of {total} checkpoints of {len(chosen)} runs at the same step and loss")


if __name__ == "__main__":
    main()
