"""Open a report in headless Chromium and check what a person would see.

Used by the tests and by ``pipetrain report --check``: every ``<img>`` must decode and not
be blank (pixel variance > 0), and the page's section ids are returned. Needs Debian's
``chromium`` (``.ci/run`` installs it); no network, no driver, no extra Python package.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipetrain.errors import ConfigError

__all__ = ["PageCheck", "find_chromium", "check_page", "screenshot"]

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--disable-dev-shm-usage"]

_PROBE = """<script>
window.addEventListener('load', function () {
  var out = {images: [], sections: []};
  document.querySelectorAll('img').forEach(function (img) {
    var v = -1;
    if (img.naturalWidth > 0) {
      var c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
      var ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
      var d = ctx.getImageData(0, 0, c.width, c.height).data, n = 0, s = 0, s2 = 0;
      for (var i = 0; i < d.length; i += 4) { var g = (d[i] + d[i + 1] + d[i + 2]) / 3; n++; s += g; s2 += g * g; }
      v = s2 / n - (s / n) * (s / n);
    }
    out.images.push({alt: img.alt, width: img.naturalWidth, height: img.naturalHeight, variance: v});
  });
  document.querySelectorAll('section[id]').forEach(function (s) { out.sections.push(s.id); });
  var pre = document.createElement('pre'); pre.id = 'pipetrain-probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


@dataclass(frozen=True, kw_only=True)
class PageCheck:
    sections: tuple[str, ...]
    images: tuple[dict, ...]

    @property
    def blank_images(self) -> tuple[str, ...]:
        return tuple(i["alt"] for i in self.images if i["width"] <= 0 or i["variance"] <= 0)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(args: list[str], timeout_s: float) -> str:
    exe = find_chromium()
    if exe is None:
        raise ConfigError("headless Chromium is not installed: `apt-get install chromium`")
    with tempfile.TemporaryDirectory(prefix="pipetrain-chromium-") as profile:
        proc = subprocess.run([exe, *_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout_s)
    return proc.stdout


def check_page(html_path: str | Path, *, timeout_s: float = 120.0) -> PageCheck:
    """Load a copy of the page with a probe script appended and read back what it found."""
    src = Path(html_path)
    text = src.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="pipetrain-page-") as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(text.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
        dom = _run(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], timeout_s)
    m = re.search(r'<pre id="pipetrain-probe">(.*?)</pre>', dom, re.S)
    if m is None:
        raise ConfigError(f"Chromium did not render {src}: no probe output")
    data = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
    return PageCheck(sections=tuple(data["sections"]), images=tuple(data["images"]))


def screenshot(html_path: str | Path, png_path: str | Path, *, width: int = 1280, height: int = 2400,
               timeout_s: float = 120.0) -> Path:
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _run([f"--window-size={width},{height}", f"--screenshot={out}", Path(html_path).resolve().as_uri()], timeout_s)
    if not out.is_file():
        raise ConfigError(f"Chromium wrote no screenshot of {html_path}")
    return out
