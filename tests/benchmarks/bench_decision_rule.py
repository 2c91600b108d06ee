"""The decision rule's operating characteristics on planted effects (analyses.calibration), at full size: the
table in docs/statistics.md and reports/calibration/.

    python tests/benchmarks/bench_decision_rule.py [--families 1000] [--resamples 1999] [--out reports/calibration]

Writes OUT/families.csv (per planted factor: the share of families with any false "holds" / "ruled out", with
exact upper bounds), OUT/columns.csv (per factor, kind and n: the share of columns that hold / are ruled out)
and OUT/operating_characteristics.md, and prints the Markdown. About 20 minutes on one CPU core at the defaults.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bridgeprobe.analyses.calibration import markdown, operating_characteristics
from bridgeprobe.probes.io.results import atomic_write, atomic_write_csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", type=int, default=1000, help="simulated families per planted factor")
    parser.add_argument("--resamples", type=int, default=1999, help="sign-flip resamples per decision")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("reports/calibration"))
    args = parser.parse_args()
    started = time.perf_counter()
    columns, families = operating_characteristics(args.families, n_resamples=args.resamples, seed=args.seed,
                                                  progress=True)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(args.out / "columns.csv", columns)
    atomic_write_csv(args.out / "families.csv", families)
    text = markdown(columns, families)
    command = (f"python tests/benchmarks/bench_decision_rule.py --families {args.families} --resamples "
               f"{args.resamples} --seed {args.seed}")
    atomic_write(args.out / "operating_characteristics.md",
                 f"Made by `{command}` in {time.perf_counter() - started:.0f} s.\n\n{text}")
    print(text)


if __name__ == "__main__":
    main()
