"""Screenshot an HTML page with headless Chromium: ``python -m infra.screenshot HTML PNG``.

Used to check what ``tokenweir report --html`` looks like without a desktop.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from pathlib import Path

from infra import InfraError

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    raise InfraError(f"no headless browser found (looked for {', '.join(BROWSERS)}): "
                     "apt-get install -y chromium")


def _prepare(html: Path, png: Path) -> tuple[str, Path]:
    """The page's file:// URL and the PNG's absolute path, with no stale PNG left there."""
    if not html.is_file():
        raise InfraError(f"{html}: no such HTML file")
    png = png.resolve()
    try:
        png.parent.mkdir(parents=True, exist_ok=True)
        png.unlink(missing_ok=True)
    except OSError as exc:
        raise InfraError(f"{png}: {exc.strerror}") from exc
    return html.resolve().as_uri(), png


async def screenshot(html: Path, png: Path, *, width: int = 1280, height: int = 2400,
                     timeout_s: float = 120.0) -> Path:
    """Render ``html`` into ``png`` at ``width`` x ``height`` CSS pixels; returns ``png``."""
    url, png = await asyncio.to_thread(_prepare, html, png)
    args = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--window-size={width},{height}", f"--screenshot={png}", url]
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise InfraError(f"cannot start {args[0]}: {exc}") from exc
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError as exc:
        proc.kill()
        await proc.wait()
        raise InfraError(f"{args[0]} took over {timeout_s:.0f}s to screenshot {html}") from exc
    if proc.returncode != 0 or not await asyncio.to_thread(png.is_file):
        tail = err.decode(errors="replace").strip().splitlines()[-5:]
        raise InfraError(f"{args[0]} exited {proc.returncode} without writing {png}: "
                         + " | ".join(tail))
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.screenshot", description=__doc__)
    parser.add_argument("html", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args(argv)
    try:
        path = asyncio.run(screenshot(args.html, args.png, width=args.width,
                                      height=args.height))
    except InfraError as exc:
        print(f"screenshot: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
