"""Look at a report as a person would: render report.html in headless Chromium and save a
screenshot of its first screen (and, with --full-page, of the whole page).

    python scripts/screenshot_report.py demo/report/report.html --out demo/report/screenshot.png

Needs a Chromium or Chrome binary (`apt-get install chromium`); without one it says so and exits
0 (nothing in cultvlm needs a browser).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(browser: str, page: Path, out: Path, width: int, height: int) -> None:
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no first-run dialogs, no state left
        subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={out.resolve()}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="report.html")
    parser.add_argument("--out", type=Path, help="PNG to write (default: screenshot.png beside the report)")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=900, help="the first screen's height in px")
    parser.add_argument("--full-page", action="store_true", help="also a tall screenshot of the whole page")
    args = parser.parse_args(argv)
    if not args.report.is_file():
        print(f"{args.report}: no such file", file=sys.stderr)
        return 1
    browser = find_browser()
    if browser is None:
        print(f"no browser found ({', '.join(BROWSERS)}): screenshot skipped; `apt-get install chromium` to take it")
        return 0
    out = args.out or args.report.with_name("screenshot.png")
    screenshot(browser, args.report, out, args.width, args.height)
    print(f"first screen ({args.width}x{args.height}) written to {out}")
    if args.full_page:
        full = out.with_name(out.stem + "_full" + out.suffix)
        screenshot(browser, args.report, full, args.width, 12000)
        print(f"whole page (up to 12000 px) written to {full}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
