#!/usr/bin/env python3
"""Render a Hone HTML report in headless Chromium and save a PNG screenshot.

    python scripts/screenshot_report.py runs/intents/compare-*/report.html [--out report.png] [--width 1280]

Needs Chromium (Debian: `apt-get install chromium`). The flags keep Chromium off the network: the report is
self-contained, so nothing needs fetching.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from honellm.testing import find_chromium  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]



def page_height(report: Path) -> int:
    """A generous height from the report's content: each figure ~520 px, each table row ~28 px."""
    text = report.read_text(encoding="utf-8")
    return min(16000, 600 + 520 * text.count("<img") + 28 * text.count("<tr>"))


def screenshot(report: Path, out: Path, width: int = 1280, height: int | None = None) -> Path:
    chromium = find_chromium()
    if chromium is None:
        sys.exit("Chromium not found: install it (Debian: apt-get install chromium)")
    height = height or page_height(report)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={out.resolve()}", report.resolve().as_uri()]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if not out.exists():
        sys.exit(f"Chromium did not write {out}:\n{result.stderr[-2000:]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: beside the report)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=None)
    args = parser.parse_args()
    out = args.out or args.report.with_suffix(".png")
    print(screenshot(args.report, out, args.width, args.height))


if __name__ == "__main__":
    main()
