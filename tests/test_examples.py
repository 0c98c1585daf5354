"""The shipped examples run and say what they claim."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_sp500_example_finds_a_calm_and_a_volatile_regime(tmp_path):
    pytest.importorskip("matplotlib")
    picture = tmp_path / "regimes.png"
    done = subprocess.run([sys.executable, str(EXAMPLES / "sp500_regimes.py"), str(picture)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = {name: (float(sd), float(stay), float(share)) for name, sd, stay, share in
             re.findall(r"(\w+) state:\s+sd ([\d.]+) %, stays with probability ([\d.]+), "
                        r"([\d.]+)% of days", done.stdout)}
    calm, volatile = found["calm"], found["volatile"]
    assert volatile[0] ** 2 >= 2 * calm[0] ** 2          # the volatile variance, at least twice
    assert calm[1] > 0.99 and volatile[1] > 0.85         # both regimes persist
    assert calm[2] > volatile[2]
    assert picture.read_bytes().startswith(b"\x89PNG")
