"""Screenshot a tokenforget report page with headless Chromium (for docs/).

    python scripts/screenshot_report.py runs/demo/report/report.html docs/report.png \
        [--width 1280] [--height 1400] [--hover '.sample[data-n="0"] .tok.corrupt']

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
    p.add_argument("--height", type=int, default=1400)
    p.add_argument("--hover", default=None, help="CSS selector of a token to hover first (shows its tooltip)")
    args = p.parse_args()
    with chromium(args.width, args.height) as driver:
        driver.get(args.page.resolve().as_uri())
        if args.hover is not None:
            from selenium.webdriver.common.action_chains import ActionChains
            from selenium.webdriver.common.by import By

            token = driver.find_element(By.CSS_SELECTOR, args.hover)
            ActionChains(driver).move_to_element(token).perform()  # scrolls only if the token is out of view
        args.png.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.png))
    print(args.png)


if __name__ == "__main__":
    main()
