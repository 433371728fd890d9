#!/usr/bin/env python3
"""Confirmation at the source on the holding hospital's page (issue 17
section 2), in a real browser: Debian's chromium through Playwright.

Run by tests/page.rs against node B of a test region:

    confirm_page_test.py --base http://127.0.0.1:PORT --user rad.sun --study UID

The password comes from the environment (HUREN_PAGE_PASSWORD). Signs in,
opens the study, reads the classifier's items with their confidence and
evidence, confirms them as a radiologist, and reads the confirmation. One
JSON line per step.
"""

import argparse
import json
import os

from playwright.sync_api import sync_playwright

from page_test import CHROMIUM_ARGS, emit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--study", required=True)
    args = ap.parse_args()
    password = os.environ["HUREN_PAGE_PASSWORD"]
    base = args.base.rstrip("/")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
        )
        context = browser.new_context(locale="zh-CN", viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(f"{base}/ui/login")
        page.fill("#user_id", args.user)
        page.fill("#password", password)
        page.click("#sign-in")
        page.wait_for_url(f"{base}/ui/")

        page.goto(f"{base}/ui/studies/{args.study}")
        items = [
            {
                "text": i.locator("p").first.inner_text(),
                "confidence": i.locator(".confidence").get_attribute("class"),
                "evidence": [r.inner_text() for r in i.locator("table.evidence tbody tr").all()],
            }
            for i in page.locator("#recognition .classified-item").all()
        ]
        checked = [
            c.get_attribute("value")
            for c in page.locator("#confirm-form input[name=item]:checked").all()
        ]
        emit(step="classified", items=items, checked=checked)

        # Without a role the confirmation is refused.
        page.click("#confirm")
        page.wait_for_load_state()
        emit(step="no_role", status_text=page.locator("main").inner_text())

        page.goto(f"{base}/ui/studies/{args.study}")
        page.select_option("#role", "radiologist")
        page.click("#confirm")
        page.wait_for_url(f"{base}/ui/studies/{args.study}?confirmed=1")
        confirmed = page.locator("#confirmed")
        emit(
            step="confirmed",
            confirmed=confirmed.inner_text() if confirmed.count() else None,
        )
        browser.close()


if __name__ == "__main__":
    main()
