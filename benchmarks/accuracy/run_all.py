"""Run every accuracy experiment, then write the markdown results table (``make accuracy``).

Default settings are the full ones (each script sized to <= 60 min on 2 CPU cores); ``--quick`` runs the
few-minute smoke versions.  Extra arguments after ``--`` go to every script.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="lm,rt,20ng", help="comma list of lm, rt, 20ng")
    args, extra = ap.parse_known_args()
    q = ["--quick"] if args.quick else []
    jobs = {"lm": [str(HERE / "lm.py")], "rt": [str(HERE / "classify.py"), "--task", "rt"],
            "20ng": [str(HERE / "classify.py"), "--task", "20ng"]}
    rc = 0
    for name in args.only.split(","):
        print(f"== {name}", flush=True)
        rc |= subprocess.call([sys.executable, *jobs[name], *q, *extra])
    subprocess.call([sys.executable, str(HERE / "report.py")] + (["--suffix", "_quick"] if args.quick else []))
    return rc


if __name__ == "__main__":
    sys.exit(main())
