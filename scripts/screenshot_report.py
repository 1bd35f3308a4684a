"""Screenshot a tokenforget report page with headless Chromium (for docs/).

    python scripts/screenshot_report.py runs/demo/report/report.html docs/report.png [--width 1280] [--height 2400]

Needs the Debian packages `chromium` and `chromium-driver` (`make install` installs them) and selenium.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from browser import chromium  # noqa: E402  (tests/browser.py: the same driver the browser test uses)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("page", type=Path)
    p.add_argument("png", type=Path)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=2400)
    p.add_argument("--hover", type=int, default=None, help="hover the N-th highlighted token first (shows its tooltip)")
    args = p.parse_args()
    with chromium(args.width, args.height) as driver:
        driver.get(args.page.resolve().as_uri())
        if args.hover is not None:
            from selenium.webdriver.common.action_chains import ActionChains
            from selenium.webdriver.common.by import By

            token = driver.find_elements(By.CSS_SELECTOR, ".tok[data-j]")[args.hover]
            ActionChains(driver).move_to_element(token).perform()
        args.png.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.png))
    print(args.png)


if __name__ == "__main__":
    main()
