"""A real browser for UI tests: Debian's chromium, driven by Playwright (no browser download).

MLflow's UI scrolls inside its own panels and keeps polling, so the page never reaches network
idle: tests wait for the elements they assert on. Screenshots go to ``test-logs/ui/`` (or
``$MLSTACK_TEST_LOGS/ui``), left there for a person to look at after CI.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from system_packages import ensure_programs

REPO = Path(__file__).resolve().parents[2]
# Wide enough that the models table renders its first metric columns (it draws only the visible ones).
VIEWPORT = {"width": 3000, "height": 1200}
# Each wait and page load: the UI's JavaScript (megabytes) arrives slowly from a server sharing
# 2 cores with a compose build, as in CI; Playwright's own default is 30 s.
UI_TIMEOUT_MS = 180_000


def screenshot_dir() -> Path:
    root = Path(os.environ.get("MLSTACK_TEST_LOGS") or REPO / "test-logs")
    path = root / "ui"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium browser (Playwright's ``Browser``), closed afterwards."""
    ensure_programs({"chromium": "chromium"})
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: Chromium's sandbox refuses to start as root, which CI is.
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def screenshot_on_failure(page, path: Path) -> Iterator[None]:
    """Whatever fails inside, the page as it was then is saved to ``path`` first."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            page.screenshot(path=str(path))
            print(f"UI test failed: the page is in {path}")
        raise


def table_row(page, label: str) -> list[str] | None:
    """The cells' texts of the row (``role=row``) whose first cell reads ``label``, or None."""
    return page.evaluate(
        """(label) => {
            for (const row of document.querySelectorAll('[role=row]')) {
                const cells = [...row.querySelectorAll('[role=cell], [role=gridcell]')].map(c => c.innerText.trim());
                if (cells.length && cells[0] === label) return cells;
            }
            return null;
        }""", label)
