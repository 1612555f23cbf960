"""A policy mounted from a Kubernetes ConfigMap reloads when the kubelet updates it.

The kubelet (AtomicWriter) never writes the visible file. The mounted directory holds
`..data -> ..<timestamp>` (a symlink to a timestamped directory) and `policy.yaml -> ..data/policy.yaml`.
An update writes a new timestamped directory, points a new `..data_tmp` symlink at it, renames that over
`..data` (atomic) and removes the old directory. `policy.yaml` itself, as a symlink, never changes: a
watcher keyed on its lstat() would miss every update. `PolicyReloader` reads the text through the
symlinks and compares it, so it sees the swap, even one that keeps the size and the mtime.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from policies.schema import Policy, parse_policy
from router.live_policy import PolicyReloader, PolicyView, policy_version

ROOT = Path(__file__).resolve().parent.parent
# Same size before and after: the edit changes a digit, so size and (set below) mtime stay.
ORIGINAL = (ROOT / "deploy" / "policy.compose.yaml").read_text()
EDITED = ORIGINAL.replace("prices: {input: 0.05,", "prices: {input: 0.06,", 1)


def kubelet_write(mount: Path, files: dict[str, str], stamp: str, mtime_ns: int | None = None) -> None:
    """What the kubelet's AtomicWriter does on a ConfigMap update, step by step."""
    target = mount / f"..{stamp}"
    target.mkdir()
    for name, text in files.items():
        (target / name).write_text(text)
        if mtime_ns is not None:
            os.utime(target / name, ns=(mtime_ns, mtime_ns))
    data = mount / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    os.symlink(target.name, mount / "..data_tmp")          # relative, as the kubelet makes it
    os.rename(mount / "..data_tmp", data)                   # the atomic swap
    for name in files:                                      # user-visible links, made once
        if not (mount / name).is_symlink():
            os.symlink(f"..data/{name}", mount / name)
    for link in mount.iterdir():                            # keys no longer in the ConfigMap
        if link.is_symlink() and not link.name.startswith("..") and link.name not in files:
            link.unlink()
    if old is not None:
        shutil.rmtree(mount / old)


def make_reloader(path: Path, interval_s: float = 2.0,
                  swapped: asyncio.Event | None = None) -> tuple[PolicyReloader, list[Policy], ThreadPoolExecutor]:
    """A reloader over `path` whose views carry only what `check` reads; `applied` collects what it swaps in
    (and `swapped` is set at each swap)."""
    def view(policy: Policy) -> PolicyView:
        return cast(PolicyView, SimpleNamespace(policy=policy, version=policy_version(policy)))

    state: dict[str, Any] = {"view": view(parse_policy(path.read_text(), str(path)))}
    applied: list[Policy] = []

    def apply(v: PolicyView) -> None:
        state["view"] = v
        applied.append(v.policy)
        if swapped is not None:
            swapped.set()

    executor = ThreadPoolExecutor(2)
    reloader = PolicyReloader(path, lambda: cast(PolicyView, state["view"]), view, apply, executor,
                              interval_s=interval_s)
    reloader.remember()
    return reloader, applied, executor


def mounted(tmp_path: Path) -> tuple[Path, int]:
    mount = tmp_path / "policy"
    mount.mkdir()
    kubelet_write(mount, {"policy.yaml": ORIGINAL}, "2026_12_03_10_00_00.000000001")
    st = os.stat(mount / "policy.yaml")
    return mount, st.st_mtime_ns


async def test_a_kubelet_configmap_swap_is_reloaded_even_with_the_same_size_and_mtime(tmp_path: Path) -> None:
    assert len(EDITED) == len(ORIGINAL) and EDITED != ORIGINAL
    mount, mtime_ns = mounted(tmp_path)
    reloader, applied, executor = make_reloader(mount / "policy.yaml")
    try:
        assert (await reloader.check()).result == "unchanged"
        link_before = os.lstat(mount / "policy.yaml")

        kubelet_write(mount, {"policy.yaml": EDITED}, "2026_12_03_10_01_00.000000002", mtime_ns=mtime_ns)

        # what a watcher keyed on the visible file would see: the same link, the same size and mtime
        link_after = os.lstat(mount / "policy.yaml")
        assert (link_after.st_ino, link_after.st_mtime_ns) == (link_before.st_ino, link_before.st_mtime_ns)
        assert os.stat(mount / "policy.yaml").st_mtime_ns == mtime_ns
        assert os.stat(mount / "policy.yaml").st_size == len(ORIGINAL.encode())
        assert sorted(p.name for p in mount.iterdir()) == ["..2026_12_03_10_01_00.000000002", "..data",
                                                           "policy.yaml"]   # the old directory is gone

        result = await reloader.check()
        assert result.result == "reloaded", result
        assert [p.tiers["fast"].prices.input for p in applied] == [0.06]
        assert (await reloader.check()).result == "unchanged"
    finally:
        executor.shutdown()


async def test_the_watcher_applies_a_configmap_swap(tmp_path: Path) -> None:
    """The periodic watcher (`run`), not only an explicit check, picks the swap up."""
    mount, _ = mounted(tmp_path)
    swapped = asyncio.Event()
    reloader, applied, executor = make_reloader(mount / "policy.yaml", interval_s=0.01, swapped=swapped)
    watcher = asyncio.create_task(reloader.run())
    try:
        kubelet_write(mount, {"policy.yaml": EDITED}, "2026_12_03_10_01_00.000000002")
        async with asyncio.timeout(60):     # a hang guard only: the wait ends at the swap
            await swapped.wait()
        assert applied[0].tiers["fast"].prices.input == 0.06
    finally:
        watcher.cancel()
        executor.shutdown()


async def test_a_configmap_update_that_drops_the_key_keeps_the_running_policy(tmp_path: Path) -> None:
    """The ConfigMap lost `policy.yaml` (a wrong key in the generator): the file disappears from the mount;
    the reload is refused, the running policy stays, and putting the key back reloads it."""
    mount, _ = mounted(tmp_path)
    reloader, applied, executor = make_reloader(mount / "policy.yaml")
    try:
        kubelet_write(mount, {"tiers.yaml": EDITED}, "2026_12_03_10_01_00.000000002")
        assert not (mount / "policy.yaml").exists()
        refused = await reloader.check()
        assert refused.result == "invalid" and refused.error is not None and "cannot read" in refused.error
        assert applied == []

        kubelet_write(mount, {"policy.yaml": EDITED}, "2026_12_03_10_02_00.000000003")
        assert (await reloader.check()).result == "reloaded"
        assert [p.tiers["fast"].prices.input for p in applied] == [0.06]
    finally:
        executor.shutdown()
