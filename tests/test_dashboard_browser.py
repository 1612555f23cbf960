"""The dashboard in real headless Chromium (Debian's chromium + chromedriver).

The `chromium` fixture finds them on PATH, or installs them with apt-get when it runs as
root (CI does), so `make install` needs only Python and PyPI. Elsewhere it skips, saying why;
under CI it never skips.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from backends.sim.run import start_sim
from policies.schema import InstanceSpec
from tests.conftest import serve_router
from tests.test_accounting import ADMIN, chat_and_settle, keys, policy

SHOTS = Path(__file__).resolve().parent.parent / ".tiergate" / "screenshots"


APT_TIMEOUT_S = 480  # apt-get update + install, together


def _found() -> tuple[str, str] | None:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def _apt_install() -> str:
    """Debian's chromium and chromium-driver, bounded in time; returns what apt said when it failed."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = "apt-get update -qq && apt-get install -y -qq chromium chromium-driver"
    try:
        done = subprocess.run(["sh", "-c", cmd], env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired:
        return f"apt-get did not finish in {APT_TIMEOUT_S} s"
    return "" if done.returncode == 0 else f"apt-get exited {done.returncode}: {(done.stderr or done.stdout)[-2000:]}"


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """(chromium, chromedriver): on PATH, else installed with apt-get as root, else a skip (never under CI)."""
    found = _found()
    if found is not None:
        return found
    can_apt = hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None
    why = "chromium and chromedriver are not on PATH and apt-get can't install them here (not root, or no apt)"
    if can_apt:
        failed = _apt_install()
        found = _found()
        if found is not None:
            return found
        why = f"installing chromium and chromium-driver with apt-get failed: {failed or 'not on PATH afterwards'}"
    if os.environ.get("CI"):
        pytest.fail(why + " (CI must run the browser test, not skip it)")
    pytest.skip(why + "; install Debian's chromium and chromium-driver (or any chromium + chromedriver on PATH)")


def browser(chromium: tuple[str, str]) -> webdriver.Chrome:
    binary, driver = chromium
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1100"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(driver))


def open_page(drv: webdriver.Chrome, url: str, key: str) -> None:
    drv.execute_cdp_cmd("Network.enable", {})
    drv.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Bearer {key}"}})
    drv.get(url)


@pytest.mark.timeout(APT_TIMEOUT_S + 300)  # the first run may install the browser
async def test_dashboard_renders_charts_with_data_and_no_console_errors(redis_url: str,
                                                                         chromium: tuple[str, str]) -> None:
    tag = uuid.uuid4().hex[:6]
    k = keys(tag)
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.1)
    try:
        async with serve_router(policy(tag), {"fast": [InstanceSpec(id=f"i-{tag}", url=sim.url)]},
                                redis_url=redis_url) as base, httpx.AsyncClient(base_url=base, timeout=30) as c:
            await chat_and_settle(c, k, {"capped": 6, "free": 3}, 16)

            def run() -> tuple[int, int, int, list[dict[str, str]], str, str]:
                drv = browser(chromium)
                try:
                    open_page(drv, base + "/dashboard", k["capped"])
                    SHOTS.mkdir(parents=True, exist_ok=True)
                    drv.save_screenshot(str(SHOTS / "tenant.png"))
                    bars = [float(e.get_attribute("data-value") or 0)
                            for e in drv.find_elements(By.CSS_SELECTOR, "svg rect.bar")]
                    lines = drv.find_elements(By.CSS_SELECTOR, "svg polyline.spend")
                    budget = drv.find_elements(By.CSS_SELECTOR, "svg line.budget")
                    text = drv.find_element(By.TAG_NAME, "body").text
                    logs = drv.get_log("browser")
                    open_page(drv, base + "/dashboard", ADMIN)
                    drv.save_screenshot(str(SHOTS / "admin.png"))
                    admin_text = drv.find_element(By.TAG_NAME, "body").text
                    logs += drv.get_log("browser")
                    return sum(1 for b in bars if b > 0), len(lines), len(budget), logs, text, admin_text
                finally:
                    drv.quit()

            bars, lines, budget, logs, text, admin_text = await asyncio.to_thread(run)
            assert bars >= 2            # spend and token bars carry real values
            assert lines == 1 and budget == 0      # burn-down drawn; a daily budget only: no monthly line
            assert [e for e in logs if e.get("level") == "SEVERE"] == []
            assert f"tenant capped-{tag}" in text and f"free-{tag}" not in text
            used = re.search(r"today's budget used\s+(<?[0-9.]+)%\s+\$([0-9.]+) left", text, re.I)
            assert used is not None and used.group(1) != "0.0" and float(used.group(2)) <= 1.0, text  # in use
            assert f"capped-{tag}" in admin_text and f"free-{tag}" in admin_text
            assert (SHOTS / "tenant.png").stat().st_size > 10_000
    finally:
        await sim.close()
