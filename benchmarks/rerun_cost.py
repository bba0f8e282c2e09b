"""What rerunning a finished `mergemix propose` costs beyond start-up, and that it writes the same bytes.

    python benchmarks/rerun_cost.py                       # recipes/demo.yaml (trains it first if need be)
    python benchmarks/rerun_cost.py --recipe R.yaml KEY=VALUE ...

Runs the proposal once (everything it needs is then on disk: experts, trial log, search.json), then times,
in turns, a fresh process that only imports what `propose` imports (start-up) and a fresh process that
reruns `propose`; prints the medians, their difference, and whether proposal.json kept its bytes.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from mergemix.recipe import load_recipe

IMPORTS = "import mergemix.cli, mergemix.pipelines.propose, mergemix.run.workspace, torch, transformers"


def _seconds(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/demo.yaml")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    propose = [sys.executable, "-m", "mergemix", "-q", "propose", args.recipe, *args.overrides]
    subprocess.run(propose, check=True)  # trains or reuses whatever is missing
    out = load_recipe(args.recipe, args.overrides).resolved_run_dir() / "proposal.json"
    before = out.read_bytes()
    startup, rerun = [], []
    for _ in range(args.repeats):
        startup.append(_seconds([sys.executable, "-c", IMPORTS]))
        rerun.append(_seconds(propose))
    s, r = statistics.median(startup), statistics.median(rerun)
    print(f"start-up (imports) {s:.1f} s; rerun of the finished proposal {r:.1f} s; beyond start-up {r - s:.1f} s")
    print(f"proposal.json kept its bytes: {out.read_bytes() == before}")


if __name__ == "__main__":
    main()
