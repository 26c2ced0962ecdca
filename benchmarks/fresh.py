"""Run one benchmark job in a fresh process: ``python SCRIPT --one JOB`` prints ``RESULT {json}``.

Each benchmark measures its jobs in processes of their own so that one job's memory, threads and
caches do not colour the next one's figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def run_fresh(script: str, job: dict[str, Any], name: str) -> dict[str, Any]:
    """The result ``script --one`` prints for ``job``; on failure its stderr's tail and an exit naming ``name``."""
    proc = subprocess.run([sys.executable, script, "--one", json.dumps(job)], capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{name} failed")
    return json.loads(line[-1][len("RESULT ") :])
