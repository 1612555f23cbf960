"""The dashboard in real headless Chromium (Debian's chromium + chromedriver).

The `chromium` fixture finds them on PATH, or installs them with apt-get when it runs as
root (CI does), so `make install` needs only Python and PyPI. Elsewhere it skips, saying why;
under CI it never skips.

At 1280 px and at 390 px (a phone, mobile viewport), signed in through the form, each page is
checked for: no horizontal overflow, every visible label at least 10 px (chart labels measured as
drawn: font size x the SVG's scale, and their boxes), no scientific notation, and the exact figures
of the seeded ledger (tests/dashboard_seed.py). Full-page screenshots go to
$TIERGATE_TEST_ARTIFACTS/dashboard/, by default tests/artifacts/dashboard/ (ignored by git).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from backends.sim.run import start_sim
from policies.schema import InstanceSpec
from tests import dashboard_seed as seeded
from tests.conftest import serve_router
from tests.test_accounting import ADMIN, chat_and_settle, keys, policy

SHOTS = Path(os.environ.get("TIERGATE_TEST_ARTIFACTS") or Path(__file__).resolve().parent / "artifacts") / "dashboard"
SCI = re.compile(r"\d[eE][+-]?\d")


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
                    lines = [e for e in drv.find_elements(By.CSS_SELECTOR, "svg polyline.spend") if e.is_displayed()]
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


# ---- the seeded ledger at two widths ----

MEASURE = """
const visible = el => el.getClientRects().length > 0 && getComputedStyle(el).visibility !== 'hidden';
const small = [];
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
for (let n = walker.nextNode(); n; n = walker.nextNode()) {
  const el = n.parentElement;
  if (!n.textContent.trim() || el.closest('title') || !visible(el)) continue;
  let size = parseFloat(getComputedStyle(el).fontSize);
  const svg = el.closest('svg');
  if (svg && svg.viewBox.baseVal && svg.viewBox.baseVal.width) {
    size *= svg.getBoundingClientRect().width / svg.viewBox.baseVal.width;
  }
  if (size < 10) small.push([el.tagName, n.textContent.trim().slice(0, 40), size]);
}
const drawn = [...document.querySelectorAll('svg text')].filter(visible).map(t => t.getBoundingClientRect().height);
return {viewport: window.innerWidth, client: document.documentElement.clientWidth,
        scroll: document.documentElement.scrollWidth,
        small: small, svgTexts: drawn.length, minSvgText: Math.min(...drawn), text: document.body.innerText};
"""


def shoot(drv: webdriver.Chrome, name: str) -> Path:
    """A full-page screenshot (beyond the viewport) under SHOTS."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = drv.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path = SHOTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def sign_in(drv: webdriver.Chrome, base: str, key: str, lands: str) -> None:
    drv.get(base + "/dashboard")
    WebDriverWait(drv, 20).until(lambda d: d.current_url.endswith("/dashboard/login"))
    drv.find_element(By.ID, "key").send_keys(key)
    drv.find_element(By.CSS_SELECTOR, "form.login button[type=submit]").click()
    WebDriverWait(drv, 20).until(lambda d: d.current_url.split("?")[0].endswith(lands))


def sign_out(drv: webdriver.Chrome) -> None:
    drv.find_element(By.CSS_SELECTOR, "form[action='/dashboard/logout'] button").click()
    WebDriverWait(drv, 20).until(lambda d: d.current_url.endswith("/dashboard/login"))


def looked_at(drv: webdriver.Chrome, name: str) -> dict[str, Any]:
    page: dict[str, Any] = drv.execute_script(MEASURE)
    page["shot"] = shoot(drv, name)
    return page


def pages_at(drv: webdriver.Chrome, base: str, width: int) -> dict[str, dict[str, Any]]:
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900,
                                                              "deviceScaleFactor": 1, "mobile": width < 600})
    out = {}
    drv.get(base + "/dashboard/login")
    out["login"] = looked_at(drv, f"login-{width}")
    sign_in(drv, base, seeded.keys(TAG)["demo"], "/dashboard")
    out["tenant"] = looked_at(drv, f"tenant-{width}")
    sign_out(drv)
    sign_in(drv, base, seeded.ADMIN, "/dashboard/admin")
    out["fleet"] = looked_at(drv, f"fleet-{width}")
    drv.get(base + f"/dashboard?tenant=fastonly-{TAG}")
    out["fastonly"] = looked_at(drv, f"fastonly-{width}")
    sign_out(drv)
    out["console"] = {"errors": [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]}
    return out


TAG = seeded.letters_tag()


def check(page: dict[str, Any], width: int, name: str) -> None:
    where = f"{name} at {width} px"
    assert page["viewport"] == width, (where, page["viewport"])
    assert page["scroll"] <= page["client"] <= width, (where, page["scroll"], page["client"])   # no sideways scroll
    assert page["small"] == [], (where, page["small"][:5])
    assert not SCI.search(page["text"]), (where, SCI.findall(page["text"]))
    if name != "login":
        assert page["svgTexts"] > 0 and page["minSvgText"] >= 10, (where, page["minSvgText"])
    assert page["shot"].stat().st_size > 5_000


@pytest.mark.timeout(APT_TIMEOUT_S + 300)  # the first run may install the browser
async def test_pages_fit_read_and_show_exact_figures_at_1280_and_390(redis: aioredis.Redis, redis_url: str,
                                                                     chromium: tuple[str, str]) -> None:
    await seeded.seed(redis, TAG)
    async with serve_router(seeded.policy(TAG), redis_url=redis_url) as base:
        def run() -> dict[int, dict[str, dict[str, Any]]]:
            drv = browser(chromium)
            try:
                return {w: pages_at(drv, base, w) for w in (1280, 390)}
            finally:
                drv.quit()

        seen = await asyncio.to_thread(run)
    for width, pages in seen.items():
        assert pages.pop("console")["errors"] == [], width          # no CSP violation, no failed load
        for name, page in pages.items():
            check(page, width, name)
        tenant = re.sub(r"\s+", " ", pages["tenant"]["text"])
        d = seeded.DEMO
        for figure in (d["spend"], d["saved"], d["saved_pct"], d["cache"], d["cache_pct"], d["slo"], d["gpu"],
                       f"no alternative: {d['no_alt']} requests", "on 6 requests balanced could serve"):
            assert figure in tenant, (width, figure)
        fleet = re.sub(r"\s+", " ", pages["fleet"]["text"])
        f = seeded.FLEET
        for figure in (f["spend"], f["saved"], f["cache"], f["interactive"], f["batch"], f["all"], f["gpu"],
                       f["gpu_cost"], f"no alternative: {f['no_alt']} requests", f"fastonly-{TAG}", "no budget"):
            assert figure in fleet, (width, figure)
        fastonly = re.sub(r"\s+", " ", pages["fastonly"]["text"])
        assert "$0.00000365" in fastonly and "no alternative: 3 requests" in fastonly
        assert "no budget set" in tenant          # the daily one (demo has a monthly budget only), in plain type
