"""Hard-example sampling weights for ``--data ...,case_weights=CSV`` from a ``glance evaluate`` run.

    glance evaluate --model glance-small --data maxslice:../shared/data/lidc-maxslice-crops,outline=interior \
        --split train --out runs/hard/evaluation
    python bench/hard_case_weights.py runs/hard/evaluation/nodules.csv --out runs/hard/case_weights.csv

Each case weighs ``floor + (1 - Dice)`` of its worst-outlined nodule (a missed nodule has Dice 0), so
with the default floor of 0.25 a missed case is drawn five times as often as a perfect one.
``--per-nodule`` weighs each nodule by its own Dice instead (columns ``case_id,label,weight``), for
volumes with many nodules such as phantoms, where nearly every case has one hard nodule. Evaluate
the *training* split: weights for validation or test cases would have no effect on training, and
looking at how the model does there to decide what it trains on would leak them into the choice.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path


def nodule_dice(nodules_csv: Path) -> dict[tuple[str, int], float]:
    """{(case_id, reference label): Dice}, a missed or unscored nodule counting 0."""
    found = {}
    with open(nodules_csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            dice = float(row["dice"]) if row["dice"] not in ("", "nan") else 0.0
            found[row["case"], int(row["gt_label"])] = dice if math.isfinite(dice) else 0.0
    return found


def case_weights(nodules_csv: Path, floor: float) -> dict[str, float]:
    """{case_id: floor + (1 - the lowest Dice among the case's reference nodules)}."""
    worst: dict[str, float] = {}
    for (case, _), dice in nodule_dice(nodules_csv).items():
        worst[case] = min(worst.get(case, 1.0), dice)
    return {case: floor + (1.0 - dice) for case, dice in sorted(worst.items())}


def nodule_weights(nodules_csv: Path, floor: float) -> dict[tuple[str, int], float]:
    """{(case_id, label): floor + (1 - that nodule's Dice)}."""
    return {key: floor + (1.0 - dice) for key, dice in sorted(nodule_dice(nodules_csv).items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("nodules_csv", type=Path, help="nodules.csv written by glance evaluate")
    ap.add_argument("--floor", type=float, default=0.25, help="weight of a perfectly outlined case (> 0)")
    ap.add_argument("--per-nodule", action="store_true", help="one weight per nodule (case_id,label,weight)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not args.floor > 0:
        raise SystemExit("--floor must be positive")
    if args.per_nodule:
        header, weights = ["case_id", "label", "weight"], nodule_weights(args.nodules_csv, args.floor)
        rows = [(case, label, f"{w:.4f}") for (case, label), w in weights.items()]
    else:
        header, weights = ["case_id", "weight"], case_weights(args.nodules_csv, args.floor)
        rows = [(case, f"{w:.4f}") for case, w in weights.items()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    heavy = sum(w > args.floor + 0.5 for w in weights.values())
    unit = "nodules" if args.per_nodule else "cases"
    print(f"{len(weights)} {unit}, {heavy} with Dice below 0.5; weights in {args.out}")


if __name__ == "__main__":
    main()
