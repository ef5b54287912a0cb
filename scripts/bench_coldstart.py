"""Cold start of `tmpdiff run` on a build directory: where the seconds go before the first step.

Runs fresh processes (median over --repeats) of: the bare interpreter, `tmpdiff --version` (CLI imports), and
`tmpdiff run BUILD --precision fp32 --steps 2`; reports the run's own sampling time from its --json output, and the
largest imports of one run (python -X importtime). Prints a table and writes JSON.

    python scripts/bench_coldstart.py build/tiny-dit --out results/cpu-xeon-2core/coldstart.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tmpdiff.formats.atomic import write_json


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return time.perf_counter() - started, done


def top_imports(build_dir: Path, out: Path, count: int = 8) -> list[tuple[str, float]]:
    """Cumulative import times (s) of the top-level packages a run imports."""
    _, done = timed([sys.executable, "-X", "importtime", "-m", "tmpdiff.cli", "run", str(build_dir), "--precision", "fp32",
                     "--steps", "2", "--out", str(out), "--force"])
    found: dict[str, float] = {}
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if match and len(match.group(2)) <= 1:  # top-level imports of the process
            found[match.group(3)] = max(found.get(match.group(3), 0.0), int(match.group(1)) / 1e6)
    return sorted(found.items(), key=lambda kv: -kv[1])[:count]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build_dir", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="JSON to write")
    args = parser.parse_args()
    image = Path(tempfile.mkdtemp()) / "cold.png"
    rows: dict[str, list[float]] = {"interpreter": [], "tmpdiff --version": [], "tmpdiff run (2 steps)": [], "sampling": []}
    for _ in range(args.repeats):
        rows["interpreter"].append(timed([sys.executable, "-c", "pass"])[0])
        rows["tmpdiff --version"].append(timed([sys.executable, "-m", "tmpdiff.cli", "--version"])[0])
        seconds, done = timed([sys.executable, "-m", "tmpdiff.cli", "run", str(args.build_dir), "--precision", "fp32",
                               "--steps", "2", "--out", str(image), "--force", "--json"])
        rows["tmpdiff run (2 steps)"].append(seconds)
        rows["sampling"].append(sum(step["seconds"] for step in json.loads(done.stdout)["steps"]))
    medians = {name: statistics.median(values) for name, values in rows.items()}
    medians["run minus interpreter and sampling"] = (medians["tmpdiff run (2 steps)"] - medians["interpreter"]
                                                     - medians["sampling"])
    imports = top_imports(args.build_dir, image)
    print(f"{'phase':<38}{'median s':>10}")
    for name, value in medians.items():
        print(f"{name:<38}{value:>10.3f}")
    print("largest top-level imports of one run (cumulative s):")
    for name, seconds in imports:
        print(f"  {name:<36}{seconds:>10.3f}")
    if args.out:
        write_json(args.out, {"format": "tmpdiff.bench_coldstart/1", "build_dir": str(args.build_dir),
                              "repeats": args.repeats, "median_seconds": medians, "raw_seconds": rows,
                              "top_imports": dict(imports)})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
