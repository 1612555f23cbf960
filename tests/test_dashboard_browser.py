"""The dashboard in real headless Chromium (Debian's chromium + chromedriver, installed by `make install`)."""

from __future__ import annotations

import asyncio
import re
import shutil
import uuid
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from backends.sim.run import start_sim
from policies.schema import InstanceSpec
from tests.conftest import serve_router
from tests.test_accounting import ADMIN, chat_and_settle, keys, policy

SHOTS = Path(__file__).resolve().parent.parent / ".tiergate" / "screenshots"


def browser() -> webdriver.Chrome:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "Debian's chromium and chromium-driver are missing: run `make install`"
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1100"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(driver))


def open_page(drv: webdriver.Chrome, url: str, key: str) -> None:
    drv.execute_cdp_cmd("Network.enable", {})
    drv.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Bearer {key}"}})
    drv.get(url)


async def test_dashboard_renders_charts_with_data_and_no_console_errors(redis_url: str) -> None:
    tag = uuid.uuid4().hex[:6]
    k = keys(tag)
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.1)
    try:
        async with serve_router(policy(tag), {"fast": [InstanceSpec(id=f"i-{tag}", url=sim.url)]},
                                redis_url=redis_url) as base, httpx.AsyncClient(base_url=base, timeout=30) as c:
            await chat_and_settle(c, k, {"capped": 6, "free": 3}, 16)

            def run() -> tuple[int, int, int, list[dict[str, str]], str, str]:
                drv = browser()
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
