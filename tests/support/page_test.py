#!/usr/bin/env python3
"""Drives the doctor's page (/ui) in a real browser: Debian's chromium through
Playwright for Python (no `playwright install`: the system browser is used).

Run by tests/page.rs against node A of a test region:

    page_test.py --base http://127.0.0.1:PORT --user dr.wang --rid NUMBER \
        --item CT-0301-01 --hospital NAME

The password comes from the environment (HUREN_PAGE_PASSWORD). Signs in,
finds the patient by resident ID number, reads the timeline, checks an order,
records "repeat" with reason 01, switches to English, signs out. Prints one
JSON line per step; the Rust test asserts on them. With HUREN_SCREENSHOTS=DIR
it saves login.png, timeline.png, warning.png and confirmation.png there.
"""

import argparse
import json
import os
import sys

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def emit(**fields):
    print(json.dumps(fields, ensure_ascii=False), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--rid", required=True)
    ap.add_argument("--item", required=True)
    ap.add_argument("--reason", default="01")
    ap.add_argument("--hospital", required=True, help="the prior's hospital name")
    args = ap.parse_args()
    password = os.environ["HUREN_PAGE_PASSWORD"]
    shots = os.environ.get("HUREN_SCREENSHOTS")
    base = args.base.rstrip("/")

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
        )
        context = browser.new_context(
            locale="zh-CN", viewport={"width": 1280, "height": 900}
        )
        page = context.new_page()
        page.set_default_timeout(30_000)
        urls = []
        page.on("request", lambda r: urls.append(r.url))

        def shot(name):
            if shots:
                os.makedirs(shots, exist_ok=True)
                page.screenshot(path=os.path.join(shots, f"{name}.png"), full_page=True)

        # Without a session the patient page sends the browser to the login.
        page.goto(f"{base}/ui/patient")
        emit(step="redirect", url=page.url)
        page.fill("#user_id", args.user)
        shot("login")

        # A wrong password first: the same answer as an unknown user.
        page.fill("#user_id", args.user)
        page.fill("#password", password + "-wrong")
        page.click("#sign-in")
        page.wait_for_load_state()
        wrong = page.locator("#login-error")
        emit(step="wrong_password", error=wrong.inner_text() if wrong.count() else None)

        page.fill("#user_id", args.user)
        page.fill("#password", password)
        page.click("#sign-in")
        page.wait_for_url(f"{base}/ui/")
        cookies = {c["name"]: c for c in context.cookies()}
        session = cookies.get("huren_session", {})
        emit(
            step="login",
            url=page.url,
            header=page.locator("header").inner_text(),
            cookie={
                "http_only": session.get("httpOnly"),
                "same_site": session.get("sameSite"),
                "path": session.get("path"),
                "secure": session.get("secure"),
            },
        )

        # Find the patient by resident ID number.
        page.check("#kind-rid")
        page.fill("#identifier", args.rid)
        page.click("#find")
        page.wait_for_url(f"{base}/ui/patient")
        rows = [
            {"uid": r.get_attribute("data-uid"), "text": r.inner_text()}
            for r in page.locator("tr.prior").all()
        ]
        emit(
            step="timeline",
            url=page.url,
            title=page.locator("#timeline h1").inner_text(),
            rows=rows,
            withheld=page.locator("#withheld").count(),
            items=page.locator("#item_code option").count(),
        )
        shot("timeline")

        # The order check: chest CT plain, outpatient.
        page.select_option("#item_code", args.item)
        page.check("#enc-outpatient")
        page.click("#check")
        page.wait_for_load_state()
        warning = page.locator("#warning")
        links = [a.get_attribute("href") for a in page.locator("#warning a.open-prior").all()]
        emit(
            step="check",
            url=page.url,
            warning=warning.count() == 1,
            text=warning.inner_text() if warning.count() else page.locator("main").inner_text(),
            hospital=args.hospital in (warning.inner_text() if warning.count() else ""),
            links=links,
            reasons=page.locator("#reason_code option").count(),
        )
        shot("warning")

        # Repeat anyway, for reason 01.
        page.check("#decision-repeated")
        page.select_option("#reason_code", args.reason)
        page.fill("#free_text", "咳嗽加重，需复查对比")
        page.click("#decide")
        page.wait_for_load_state()
        confirmation = page.locator("#confirmation")
        emit(
            step="decision",
            url=page.url,
            confirmed=confirmation.count() == 1,
            title=page.locator("main h1").first.inner_text(),
            text=confirmation.inner_text() if confirmation.count() else page.locator("main").inner_text(),
        )
        shot("confirmation")

        # The prior's study page (held at the other hospital); its images
        # link (/images, the viewer) is tests/viewer.rs's.
        if links:
            study = links[0].removesuffix("/images")
            page.goto(f"{base}{study}" if study.startswith("/") else study)
            held = page.locator("#held-elsewhere")
            emit(
                step="study",
                held_elsewhere=held.count() == 1,
                text=held.inner_text() if held.count() else page.locator("main").inner_text(),
            )

        # English, remembered in a cookie.
        page.goto(f"{base}/ui/patient?lang=en")
        english = page.locator("#timeline h1").inner_text()
        page.goto(f"{base}/ui/")
        emit(step="english", title=english, find=page.locator("main h1").inner_text())

        # Sign out: the patient page sends to the login again.
        page.click("#sign-out")
        page.wait_for_url(f"{base}/ui/login")
        page.goto(f"{base}/ui/patient")
        emit(step="signed_out", url=page.url)

        emit(step="urls", urls=urls)
        browser.close()


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # a readable failure for the Rust test's assert
        emit(step="error", error=f"{type(e).__name__}: {e}")
        sys.exit(1)
