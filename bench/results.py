"""bench/RESULTS.md is made of sections, one per benchmark, each between its own begin/end markers;
a benchmark run with --write-results replaces its section and leaves the others as they are."""
from __future__ import annotations

import os

RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
_HEADER = "# Benchmark results\n\nEach section is written by its benchmark; see the command in it.\n"


def write_section(begin: str, end: str, section: str, path: str = RESULTS_PATH) -> None:
    """Replace the text from ``begin`` to ``end`` (markers included in ``section``), or append it."""
    text = _HEADER
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)
