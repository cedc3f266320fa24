"""A long fuzz run: many random layers through the whole toolkit, tallied, never stopping at a failure.

    python scripts/soak.py                          # 1,000 fused and 1,000 step-by-step layers
    python scripts/soak.py --family fused --examples 2000 --lines 6

The layers are the ones ``tests/test_fuzz.py`` writes (``tests/fuzz``), checked the same way
(``fuzz.harness.run``: derive, generate, import, compare with autograd in float64, gradcheck).
Unlike the test, a failure does not stop the run: its spec is saved to ``--save`` (a file to hand
to ``derive generate --layer``) and the run goes on, so one soak reports every kind of failure.
The last line is the tally; the exit status is 1 when any layer failed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

STATUSES = ("passed", "refused", "slow", "failed")


def soak(fused: bool, examples: int, lines: int, save: Path, every: int = 100) -> Counter:
    from fuzz.harness import run
    from fuzz.specs import layer_specs

    family = "fused" if fused else "step-by-step"
    tally, reasons, names = Counter(), Counter(), set()
    folder = Path(tempfile.mkdtemp(prefix="derive-soak-"))
    start = time.perf_counter()

    # generation only: a failure is saved and counted, not shrunk (shrinking one takes minutes)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(spec=layer_specs(fused, lines))
    def check(spec):
        names.add(spec.name)
        try:
            outcome = run(spec, folder)
            tally[outcome.status] += 1
            if outcome.status == "refused":
                reasons[outcome.message.split(": ", 1)[1]] += 1
            elif outcome.status == "slow":
                (save / f"{spec.name}.py").write_text(spec.source)
                print(f"slow: {save / spec.name}.py", flush=True)
        except Exception as e:  # a wrong result or a crash: keep the spec, go on
            tally["failed"] += 1
            (save / f"{spec.name}.py").write_text(spec.source)
            print(f"FAILED: {save / spec.name}.py\n{traceback.format_exception_only(e)[-1][:2000]}", flush=True)
        done = sum(tally.values())
        if done % every == 0:
            print(f"  {family}: {done} layers, {dict(tally)}, {time.perf_counter() - start:.0f} s", flush=True)

    check()
    seconds = time.perf_counter() - start
    print(f"soak {family}, up to {lines} lines: {sum(tally.values())} random layers tried ({len(names)} distinct), "
          + ", ".join(f"{tally[s]} {s}" for s in STATUSES) + f", {seconds:.0f} s")
    for reason, count in reasons.most_common():
        print(f"  {count} refused: {reason}")
    return tally


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=["fused", "steps", "both"], default="both")
    p.add_argument("--examples", type=int, default=1000, help="random layers per family (default 1000)")
    p.add_argument("--lines", type=int, default=6, help="most operations per layer (default 6)")
    p.add_argument("--seconds", type=int, default=60,
                   help="a derivation running longer is stopped and counted as slow (default 60)")
    p.add_argument("--save", type=Path, default=Path("build/soak"), help="where failing specs go (default build/soak)")
    args = p.parse_args(argv)
    os.environ["DERIVE_FUZZ_SECONDS"] = str(args.seconds)  # read by the harness when it is imported
    args.save.mkdir(parents=True, exist_ok=True)
    families = {"fused": [True], "steps": [False], "both": [True, False]}[args.family]
    failed = 0
    for fused in families:
        failed += soak(fused, args.examples, args.lines, args.save)["failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
