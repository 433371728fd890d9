#!/usr/bin/env python3
"""Browser side of benches/viewer.sh (issue 19). Not a test.

    viewer-browser.py --base URL --user ID --rid NUMBER --study UID [--warm [--warm-visits V]]

Signs in at node A's page (password in HUREN_PAGE_PASSWORD), finds the
patient (the timeline asks the registry, which tells A that B holds the
study), clicks the prior's 查看 link and measures, from the click:

- first_image_s: until the viewer's viewport shows the study: its pixels
  have more than 16 grey levels over a spread of 64. By default a probe in
  the viewer's page reads the viewport's canvas each time Cornerstone has
  rendered an image in it, and notes the time (`--probe canvas`); a screenshot then
  confirms the draw. `--probe screenshot` (the method before 2026-12-07's last round)
  polls element screenshots instead: each costs the browser a capture on
  its CPUs while it draws, and the draw is seen up to one capture late;
- instances_at_first_image: how many of the study's instances A held then,
  verified (A's manifest of the study, with the operator's token,
  HUREN_BENCH_TOKEN): asked by the in-page probe the moment it sees the
  image (`--probe canvas`), or after the screenshot that showed it;
- fetch_s: until A's peer audit records the fetch as done (its `at`);
- viewer_opened_s: until the page shows the viewer (framed under the
  fetch's progress once the manifest is verified); first_image_s minus
  this is the viewer's own start and first draw.

With HUREN_SCREENSHOTS=DIR, saves the progress page (a look with images
in) as viewer-progress.png there. With HUREN_BENCH_CPUPROFILE=FILE, writes
the page's JavaScript CPU profile (V8's sampling profiler through the
DevTools protocol, from the click to the first image; the framed viewer
runs in the page's process, so it is included) as a .cpuprofile that
Chrome's DevTools open; benches/cpuprofile-summary.py sums it up.

Prints one JSON line. Chromium: Debian's, through Playwright, software
WebGL.
"""

import argparse
import datetime
import io
import json
import os
import sys
import time
import urllib.error
import urllib.request

from PIL import Image
from playwright.sync_api import Error as PlaywrightError, sync_playwright

ARGS = ["--headless", "--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader",
        "--enable-unsafe-swiftshader", "--no-first-run", "--disable-sync"]


def api(base, path, token):
    req = urllib.request.Request(base + path, headers={"authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
        return json.loads(body) if body else None


def held(base, study, token):
    """Instances of the study in A's own index, verified (A's manifest of
    it: QIDO-RS at A answers for a study still arriving from the holding
    node, so it cannot count what A holds)."""
    try:
        return len(api(base, f"/api/v1/studies/{study}/manifest", token)["instances"])
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return 0
        raise


def drawn(png):
    img = Image.open(io.BytesIO(png)).convert("L")
    hist = img.histogram()
    total = sum(hist)
    lit = [i for i, n in enumerate(hist) if n]
    levels = sum(1 for n in hist if n * 2000 >= total)
    return levels > 16 and lit and max(lit) - min(lit) > 64


# The in-page probe (`--probe canvas`): in the viewer's document, each time
# Cornerstone reports a viewport rendered (CORNERSTONE_IMAGE_RENDERED, heard
# in the capture phase on the document, since it does not bubble) with an
# image loaded in it, the viewport's canvas is scaled down to 160 pixels
# wide and its grey levels counted as drawn() counts them; the first time
# the image qualifies, the wall clock (ms since the epoch) at the event is
# kept. Without Cornerstone's global (another viewer build), the canvas is
# read every 250 ms instead. Reading the canvas back costs the viewer's
# thread 50-100 ms under software GL: until 2026-12-08 the probe read it at
# every animation frame, which a JavaScript CPU profile showed costing the
# thread about 1 s before the first image, so figures measured with it are
# late by up to that much.
CANVAS_PROBE = """
(() => {
  if (!location.pathname.startsWith('/viewer')) return;
  window.__hurenDrawnAt = null;
  window.__hurenDrawnBy = null;
  window.__hurenReads = 0;
  const probe = document.createElement('canvas');
  let timer = null;
  const check = (by, element) => {
    const at = Date.now();
    if (window.__hurenDrawnAt !== null) return;
    if (element && window.cornerstone) {
      try {
        const vp = window.cornerstone.getEnabledElement(element)?.viewport;
        if (vp && typeof vp.getImageData === 'function' && !vp.getImageData()) return;
      } catch (e) { /* an element Cornerstone no longer knows: read the canvas */ }
    }
    const c = (element || document).querySelector('canvas.cornerstone-canvas');
    if (!(c && c.width > 50 && c.height > 50 && c.getBoundingClientRect().width > 50)) return;
    window.__hurenReads++;
    const w = 160, h = Math.max(1, Math.round(160 * c.height / c.width));
    if (probe.width !== w || probe.height !== h) { probe.width = w; probe.height = h; }
    const ctx = probe.getContext('2d', { willReadFrequently: true });
    ctx.drawImage(c, 0, 0, w, h);
    const d = ctx.getImageData(0, 0, w, h).data;
    const hist = new Uint32Array(256);
    for (let i = 0; i < d.length; i += 4) {
      hist[(0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2] + 0.5) | 0]++;
    }
    const total = w * h;
    let levels = 0, lo = 255, hi = 0;
    hist.forEach((n, v) => {
      if (n * 2000 >= total) levels++;
      if (n) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    });
    if (levels > 16 && hi - lo > 64) {
      window.__hurenDrawnAt = at;
      window.__hurenDrawnBy = by;
      clearInterval(timer);
      // What A holds at this moment, asked from here: the test's side
      // would learn of the draw only when the page's busy thread lets it.
      fetch(MANIFEST, { headers: { authorization: 'Bearer ' + TOKEN } })
        .then(r => (r.status === 404 ? { instances: [] } : r.json()))
        .then(j => { window.__hurenHeldAtDraw = j.instances.length; })
        .catch(e => { window.__hurenHeldAtDraw = -1; });
    }
  };
  document.addEventListener('CORNERSTONE_IMAGE_RENDERED', (e) => check('event', e.detail?.element || e.target), true);
  timer = setInterval(() => { if (!window.cornerstone) check('timer', null); }, 250);
})();
"""


def viewer_frame(page):
    """The frame the viewer runs in: the page itself, or the iframe the
    page frames it in under the fetch's progress."""
    for f in page.frames:
        if "/viewer/" in f.url:
            return f
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--rid", required=True)
    ap.add_argument("--study", required=True)
    ap.add_argument("--warm", action="store_true",
                    help="open the viewer once before the click (a doctor's browser that has"
                         " used it today: OHIF's files in its cache)")
    ap.add_argument("--warm-visits", type=int, default=1,
                    help="with --warm: how many times (Chromium reuses a script's compiled"
                         " code from its third load)")
    ap.add_argument("--probe", choices=("canvas", "screenshot"), default="canvas",
                    help="how the first image is seen (module docstring)")
    a = ap.parse_args()
    token = os.environ["HUREN_BENCH_TOKEN"]
    with sync_playwright() as p:
        # HUREN_BENCH_CHROMIUM_ARGS: more switches for the browser, e.g.
        # --disable-gpu-compositing (a workstation whose GPU Chromium does
        # not use: software compositing, WebGL still SwiftShader's).
        extra = os.environ.get("HUREN_BENCH_CHROMIUM_ARGS", "").split()
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS + extra)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(120_000)
        if a.probe == "canvas":
            page.add_init_script(
                f"const MANIFEST = {json.dumps(f'/api/v1/studies/{a.study}/manifest')};"
                f" const TOKEN = {json.dumps(token)};" + CANVAS_PROBE)
        page.goto(f"{a.base}/ui/login")
        page.fill("#user_id", a.user)
        page.fill("#password", os.environ["HUREN_PAGE_PASSWORD"])
        page.click("#sign-in")
        page.wait_for_url(f"{a.base}/ui/")
        if a.warm:
            # OHIF's files into the browser's cache (the node lets them be
            # cached for an hour); no study is opened, nothing fetched.
            for _ in range(a.warm_visits):
                page.goto(f"{a.base}/viewer/", wait_until="networkidle")
                page.goto(f"{a.base}/ui/")
        page.check("#kind-rid")
        page.fill("#identifier", a.rid)
        page.click("#find")
        page.wait_for_url(f"{a.base}/ui/patient")
        # With HUREN_BENCH_TRACE=FILE: every request after the click, with
        # its start and end (s from the click) and status, as JSON lines.
        trace_path, traced = os.environ.get("HUREN_BENCH_TRACE"), {}
        if trace_path:
            page.on("request", lambda r: traced.setdefault(id(r), {
                "url": r.url, "start": round(time.monotonic() - clicked, 3)}))
            page.on("requestfinished", lambda r: traced.get(id(r), {}).update(
                end=round(time.monotonic() - clicked, 3)))
            page.on("response", lambda r: traced.get(id(r.request), {}).update(status=r.status))
        link = page.locator(f'tr.prior[data-uid="{a.study}"] a[href$="/images"]')
        cpuprofile = os.environ.get("HUREN_BENCH_CPUPROFILE")
        if cpuprofile:
            cdp = page.context.new_cdp_session(page)
            cdp.send("Profiler.enable")
            cdp.send("Profiler.setSamplingInterval", {"interval": 200})
            cdp.send("Profiler.start")
        # With HUREN_BENCH_CHROME_TRACE=FILE: Chromium's own trace (the
        # renderer's main thread: scripts, parsing, style, layout, paint)
        # from the click to the first image, for chrome://tracing or
        # benches/chrome-trace-summary.py.
        chrome_trace = os.environ.get("HUREN_BENCH_CHROME_TRACE")
        if chrome_trace:
            browser.start_tracing(page=page, path=chrome_trace, categories=[
                "devtools.timeline", "v8", "v8.execute", "blink", "loading", "toplevel",
                "disabled-by-default-devtools.timeline"])
            # The click's moment in the trace's own clock.
            page.evaluate("console.timeStamp('huren-click')")
        clicked_wall = datetime.datetime.now(datetime.timezone.utc)
        clicked_epoch = time.time()
        clicked = time.monotonic()
        link.click()
        deadline = clicked + 1800
        first, at_first, opened, shot = None, None, None, os.environ.get("HUREN_SCREENSHOTS")
        seen_by = None
        # How long each polling screenshot took (`--probe screenshot`).
        shots = []
        while time.monotonic() < deadline:
            try:
                # The viewer opens framed under the fetch's progress while
                # the study arrives, or itself once it is all here.
                framed = "/viewer/" not in page.url and page.locator("#viewer-frame").count() > 0
                if opened is None and ("/viewer/" in page.url or framed):
                    opened = time.monotonic() - clicked
                if shot and "/images" in page.url and page.locator(
                        "#fetch-progress:not([value='0'])").count():
                    os.makedirs(shot, exist_ok=True)
                    page.screenshot(path=os.path.join(shot, "viewer-progress.png"))
                    shot = None
                view = page.frame_locator("#viewer-frame") if framed else page
                canvas = view.locator("canvas.cornerstone-canvas")
                frame = viewer_frame(page) if a.probe == "canvas" else None
                drawn_at = frame.evaluate("window.__hurenDrawnAt || null") if frame else None
                if drawn_at is not None:
                    first = drawn_at / 1000 - clicked_epoch
                    seen_by = frame.evaluate("window.__hurenDrawnBy + ' (' + window.__hurenReads + ' reads)'")
                    # Counted by the probe the moment it saw the image.
                    while (at_first := frame.evaluate("window.__hurenHeldAtDraw ?? null")) is None:
                        page.wait_for_timeout(20)
                    if at_first < 0:
                        sys.exit("the probe could not ask A what it holds")
                    if not drawn(canvas.first.screenshot()):
                        sys.exit("the canvas probe saw an image the screenshot does not show")
                    break
                if a.probe == "screenshot" and opened is not None and canvas.count():
                    box = canvas.first.bounding_box()
                    shot_started = time.monotonic()
                    png = canvas.first.screenshot() if box and box["width"] > 50 else None
                    shots.append(time.monotonic() - shot_started)
                    if png and drawn(png):
                        first = time.monotonic() - clicked
                        at_first = held(a.base, a.study, token)
                        break
            except PlaywrightError as e:
                if not any(w in str(e) for w in ("context was destroyed", "navigat", "Timeout")):
                    raise
            page.wait_for_timeout(50)
        if chrome_trace:
            browser.stop_tracing()
        if cpuprofile:
            # Started just before the click: its startTime is the click.
            profile = cdp.send("Profiler.stop")["profile"]
            with open(cpuprofile, "w") as f:
                json.dump(profile, f)
        if trace_path:
            # The viewer's own record of its requests (Resource Timing):
            # when each was sent, its first byte and its end, as the
            # network stack saw them, not as events reached this script.
            frame = viewer_frame(page)
            timings = frame.evaluate("""() => performance.getEntriesByType('resource')
                .filter(e => e.name.includes('/dicom-web/'))
                .map(e => ({url: e.name, origin: performance.timeOrigin, start: e.startTime,
                            request: e.requestStart, first_byte: e.responseStart, end: e.responseEnd}))""") if frame else []
            with open(trace_path, "w") as f:
                f.write(json.dumps({"first_image": round(first or -1, 3)}) + "\n")
                for t in timings:
                    at = lambda ms: round((t["origin"] + ms) / 1000 - clicked_epoch, 3) if ms else None
                    f.write(json.dumps({"resource": t["url"], "start": at(t["start"]),
                                        "request": at(t["request"]), "first_byte": at(t["first_byte"]),
                                        "end": at(t["end"])}) + "\n")
                for t in sorted(traced.values(), key=lambda t: t["start"]):
                    f.write(json.dumps(t) + "\n")
        if first is None:
            sys.exit("the viewer drew nothing within the deadline")
        # How the viewer drew, and what node A's `auto` found this
        # browser's WebGL to be (null unless `auto`).
        frame = viewer_frame(page)
        drawn_on = frame.evaluate(
            "window.cornerstone?.getShouldUseCPURendering?.() ? 'cpu' : 'webgl'") if frame else None
        webgl_found = frame.evaluate("window.hurenWebgl ?? null") if frame else None
        fetch_s = None
        while time.monotonic() < deadline:
            done = [e for e in api(a.base, "/api/v1/peer/audit", token)["entries"]
                    if e["action"] == "fetched" and e["study_instance_uid"] == a.study]
            if done:
                at = datetime.datetime.fromisoformat(done[0]["at"].replace("Z", "+00:00"))
                fetch_s = (at - clicked_wall).total_seconds()
                break
            time.sleep(0.1)
        print(json.dumps({
            "first_image_s": round(first, 3),
            "probe": a.probe,
            "seen_by": seen_by,
            "screenshots": len(shots),
            "screenshot_s": round(sum(shots) / len(shots), 3) if shots else None,
            "viewer_opened_s": round(opened, 3) if opened is not None else None,
            "instances_at_first_image": at_first,
            "fetch_s": round(fetch_s, 3) if fetch_s is not None else None,
            "instances": held(a.base, a.study, token),
            "drawn_on": drawn_on,
            "webgl_found": webgl_found,
        }), flush=True)
        browser.close()


if __name__ == "__main__":
    main()
