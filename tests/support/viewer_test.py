#!/usr/bin/env python3
"""Drives the node's viewer (/viewer, OHIF) in Debian's chromium through
Playwright, for tests/viewer.rs (issue 19).

    viewer_test.py anonymous --base URL --study UID
        Opens the viewer on the study without signing in; reports the status
        of every DICOMweb request the viewer made.

    viewer_test.py doctor --base URL --user ID --rid NUMBER --item CODE --study UID
        Signs in at the page, finds the patient, checks an order (the warning
        cites the prior held at another hospital), clicks 查看影像 on the
        warning, follows the fetch's progress page into the viewer, and waits
        until the viewer has drawn the study: the viewport's pixels (taken
        from a screenshot: cornerstone draws with WebGL, whose buffer a
        script cannot read back) are not blank and have many grey levels.
        Then reads the thumbnails on the timeline and on the warning card.

The password comes from HUREN_PAGE_PASSWORD. One JSON line per step on
stdout. Every wait polls with a deadline. With HUREN_SCREENSHOTS=DIR it
saves viewer-warning.png, viewer-progress.png, viewer.png and
viewer-timeline.png there.
"""

import argparse
import io
import json
import os
import sys
import time

from PIL import Image
from playwright.sync_api import Error as PlaywrightError, sync_playwright

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # Software WebGL (SwiftShader): no GPU here, and OHIF's viewports need
    # WebGL (or fall back to its CPU renderer).
    "--use-gl=angle",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
]

DEADLINE_S = 180


def emit(**fields):
    print(json.dumps(fields, ensure_ascii=False), flush=True)


def grey_levels(png):
    """Distinct grey levels (of 256) holding at least 0.05% of the pixels,
    and the spread between the darkest and brightest."""
    img = Image.open(io.BytesIO(png)).convert("L")
    hist = img.histogram()
    total = sum(hist)
    levels = sum(1 for n in hist if n * 2000 >= total)
    lit = [i for i, n in enumerate(hist) if n]
    return levels, (max(lit) - min(lit)) if lit else 0


def browser_context(p):
    browser = p.chromium.launch(
        executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
    )
    context = browser.new_context(locale="zh-CN", viewport={"width": 1400, "height": 900})
    return browser, context


def watch_dicomweb(page, missing=None):
    seen = []

    def on_response(r):
        if "/dicom-web/" in r.url:
            seen.append({"url": r.url, "status": r.status, "method": r.request.method,
                         "content_type": r.headers.get("content-type", "")})
        elif r.status == 404 and missing is not None:
            missing.append(r.url)

    page.on("response", on_response)
    return seen


def anonymous(args):
    with sync_playwright() as p:
        browser, context = browser_context(p)
        page = context.new_page()
        seen = watch_dicomweb(page)
        page.goto(f"{args.base}/viewer/viewer?StudyInstanceUIDs={args.study}")
        deadline = time.monotonic() + DEADLINE_S
        while not seen and time.monotonic() < deadline:
            page.wait_for_timeout(100)
        qido_root = page.evaluate(
            "() => window.config && window.config.dataSources[0].configuration.qidoRoot"
        )
        emit(step="anonymous", qido_root=qido_root, requests=seen,
             cookies=[c["name"] for c in context.cookies()])
        browser.close()


def wait_loaded(page, img):
    """Polls until an <img> has loaded (the page's CSP forbids the eval
    that Playwright's wait_for_function needs)."""
    img.scroll_into_view_if_needed()
    deadline = time.monotonic() + 60
    while not img.evaluate("e => e.complete && e.naturalWidth > 0"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"image not loaded: {img}")
        page.wait_for_timeout(50)


def shot(page, name, **kw):
    shots = os.environ.get("HUREN_SCREENSHOTS")
    if shots:
        os.makedirs(shots, exist_ok=True)
        page.screenshot(path=os.path.join(shots, name), **kw)


def doctor(args):
    password = os.environ["HUREN_PAGE_PASSWORD"]
    with sync_playwright() as p:
        browser, context = browser_context(p)
        page = context.new_page()
        page.set_default_timeout(60_000)
        missing = []
        seen = watch_dicomweb(page, missing)
        visited = []
        page.on("framenavigated", lambda f: visited.append(f.url) if f == page.main_frame else None)
        console = []
        page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)

        page.goto(f"{args.base}/ui/login")
        page.fill("#user_id", args.user)
        page.fill("#password", password)
        page.click("#sign-in")
        page.wait_for_url(f"{args.base}/ui/")
        page.check("#kind-rid")
        page.fill("#identifier", args.rid)
        page.click("#find")
        page.wait_for_url(f"{args.base}/ui/patient")
        page.select_option("#item_code", args.item)
        page.check("#enc-outpatient")
        page.click("#check")
        page.wait_for_load_state()
        warning = page.locator("#warning")
        link = page.locator("#warning a.open-prior")
        emit(step="warning", warning=warning.count() == 1,
             href=link.get_attribute("href") if link.count() else None,
             thumbs_before=page.locator("#cited-thumbs img").count(),
             no_thumbs=page.locator("#warning .no-thumbs").count())
        shot(page, "viewer-warning.png", full_page=True)

        # 查看影像: the fetch from the other hospital, then the viewer.
        clicked = time.monotonic()
        link.click()
        progress_seen = None
        deadline = time.monotonic() + DEADLINE_S
        # A prior arriving from the other hospital opens in the viewer at
        # once, framed under the fetch's progress strip (#viewer-frame); a
        # study already here goes to the viewer itself.
        def framing():
            # A look may race the progress page's own reload: taken again.
            try:
                return page.locator("#viewer-frame").count() > 0
            except PlaywrightError:
                return False

        while "/viewer/" not in page.url and not framing() and time.monotonic() < deadline:
            # The progress page reloads itself every second: a look may
            # race a navigation, and is simply taken again.
            try:
                counts = page.locator("#fetch-counts")
                failed = page.locator("#images-failed")
                if failed.count():
                    emit(step="failed", kind=failed.get_attribute("data-kind", timeout=1000),
                         text=failed.inner_text(timeout=1000))
                    sys.exit(1)
                # The screenshot shows the furthest look with images in.
                if counts.count():
                    text = counts.inner_text(timeout=1000)
                    if text != progress_seen:
                        progress_seen = text
                        if page.locator("#fetch-progress:not([value='0'])").count():
                            shot(page, "viewer-progress.png", full_page=True)
            except PlaywrightError as e:
                # A timeout here is the element gone with the page.
                if not any(w in str(e) for w in ("context was destroyed", "navigat", "Timeout")):
                    raise
            page.wait_for_timeout(100)
        framed = "/viewer/" not in page.url and framing()
        view = page.frame_locator("#viewer-frame") if framed else page
        emit(step="opened", url=page.url, progress=progress_seen, framed=framed,
             seconds=round(time.monotonic() - clicked, 3),
             through_progress_page=any("/images" in u for u in visited))

        def strip_counts():
            """The progress strip's instances here and in all, while framed."""
            if not framed:
                return None, None
            try:
                body = page.frame_locator("#progress-frame").locator("body")
                return (int(body.get_attribute("data-done", timeout=2000)),
                        int(body.get_attribute("data-total", timeout=2000)))
            except (PlaywrightError, TypeError, ValueError):
                return None, None

        # The viewer draws the study: poll the viewport's pixels.
        levels, spread, drawn = 0, 0, None
        here_at_draw, total = None, None
        while time.monotonic() < deadline:
            canvas = view.locator("canvas.cornerstone-canvas")
            if canvas.count():
                first = canvas.first
                box = first.bounding_box()
                if box and box["width"] > 50 and box["height"] > 50:
                    levels, spread = grey_levels(first.screenshot())
                    if levels > 16 and spread > 64:
                        drawn = round(time.monotonic() - clicked, 3)
                        here_at_draw, total = strip_counts()
                        break
            page.wait_for_timeout(200)
        # Whether Cornerstone draws on the CPU (the node's viewer_rendering).
        viewer = next((f for f in page.frames if "/viewer/" in f.url), None)
        cpu_rendering = viewer.evaluate(
            "window.cornerstone?.getShouldUseCPURendering?.() ?? null") if viewer else None
        # What `auto` found this browser's WebGL to be (app-config.js).
        webgl_found = viewer.evaluate("window.hurenWebgl ?? null") if viewer else None
        emit(step="drawn", levels=levels, spread=spread, seconds=drawn,
             here_at_draw=here_at_draw, total=total, cpu_rendering=cpu_rendering,
             webgl_found=webgl_found,
             canvases=view.locator("canvas.cornerstone-canvas").count())
        # The viewer's series thumbnails are the node's rendered JPEGs
        # (thumbnailRendering "thumbnail"): wait for one per series.
        def thumbnail_statuses():
            return [r["status"] for r in seen if "/thumbnail" in r["url"].split("?")[0]]
        while len(thumbnail_statuses()) < 2 and time.monotonic() < deadline:
            page.wait_for_timeout(200)
        emit(step="viewer_thumbs", statuses=thumbnail_statuses(),
             urls=[r["url"] for r in seen if "/thumbnail" in r["url"]][:4])
        # OHIF's first-visit tour and notice cover the image in a screenshot.
        for label in ["Skip all", "Confirm and hide"]:
            button = view.get_by_text(label, exact=True)
            if button.count():
                button.first.click()
        shot(page, "viewer.png")
        # The rest of the study arrives under the viewer: the strip says so.
        if framed:
            state = None
            while time.monotonic() < deadline:
                try:
                    state = page.frame_locator("#progress-frame").locator("body").get_attribute(
                        "data-state", timeout=2000)
                except PlaywrightError:
                    state = None
                if state in ("done", "failed"):
                    break
                page.wait_for_timeout(300)
            emit(step="arrived", state=state, seconds=round(time.monotonic() - clicked, 3))
            shot(page, "viewer-arrived.png")
        statuses = sorted({r["status"] for r in seen})
        # The frames the viewer read: their media types (single part or
        # multipart).
        frame_types = sorted({r["content_type"].split(";")[0] for r in seen
                              if "/frames/" in r["url"] and r["status"] == 200})
        emit(step="dicomweb", statuses=statuses, count=len(seen), frame_types=frame_types,
             methods=sorted({r["method"] for r in seen}),
             refused=[r for r in seen if r["status"] in (401, 403)],
             failed=[r for r in seen if r["status"] >= 500],
             missing=missing, console_errors=console[:10])

        # The timeline: a thumbnail per series of the fetched prior.
        page.goto(f"{args.base}/ui/patient")
        imgs = page.locator(f'tr.prior[data-uid="{args.study}"] .thumbs img')
        loaded = 0
        for i in range(imgs.count()):
            wait_loaded(page, imgs.nth(i))
            loaded += 1
        row = page.locator(f'tr.prior[data-uid="{args.study}"] .thumbs')
        emit(step="timeline_thumbs", count=imgs.count(), loaded=loaded,
             text=row.inner_text() if row.count() else "",
             lazy=[imgs.nth(i).get_attribute("loading") for i in range(imgs.count())])
        shot(page, "viewer-timeline.png", full_page=True)

        # The warning card now shows the prior's series too.
        page.select_option("#item_code", args.item)
        page.check("#enc-outpatient")
        page.click("#check")
        page.wait_for_load_state()
        cited = page.locator("#cited-thumbs img")
        for i in range(cited.count()):
            wait_loaded(page, cited.nth(i))
        emit(step="warning_thumbs", count=cited.count())
        shot(page, "viewer-warning-thumbnails.png", full_page=True)
        browser.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["anonymous", "doctor"])
    ap.add_argument("--base", required=True)
    ap.add_argument("--study", required=True)
    ap.add_argument("--user")
    ap.add_argument("--rid")
    ap.add_argument("--item")
    args = ap.parse_args()
    args.base = args.base.rstrip("/")
    {"anonymous": anonymous, "doctor": doctor}[args.mode](args)


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except Exception as e:  # a readable failure for the Rust test's assert
        emit(step="error", error=f"{type(e).__name__}: {e}")
        sys.exit(1)
