"""The login page in a real browser (headless Debian Chromium): log in, land where the role
lands, log out; a wrong password is refused with a message."""

from __future__ import annotations

from typing import Any

from tests.web import WebNode, login, screenshot


def test_login_lands_by_role_and_logout(browser: Any, web: WebNode) -> None:
    page = browser.new_page()
    page.goto(f"{web.url}/")  # not logged in: sent to the login page
    assert "/login?next=/" in page.url
    screenshot(page, "login")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", "not the password")
    page.click("button[type=submit]")
    assert "wrong user name or password" in page.inner_text("[role=alert]")
    page.close()
    for role, home in (("auditor", "/audit"), ("radiologist", "/findings"), ("admin", "/")):
        page = login(browser, web, role)
        assert page.url.rstrip("/").endswith(home.rstrip("/")) or page.url.endswith(home)
        if role == "auditor":  # no retry button anywhere, and the API refuses
            page.goto(f"{web.url}/jobs")
            assert "may not" in page.inner_text("main")
            assert page.locator("button:has-text('Retry')").count() == 0
            r = page.request.post(f"{web.url}/api/jobs/1/retry",
                                  headers={"X-CSRF-Token": page.evaluate(
                                      "() => JSON.parse(document.body.getAttribute("
                                      "'hx-headers'))['X-CSRF-Token']")})
            assert r.status == 403 and "jobs:write" in r.json()["detail"]
            page.goto(f"{web.url}/audit")
        if role == "admin":
            nav = page.inner_text("header nav")
            assert "Audit" in nav and "Jobs" in nav and "Users" in nav
            screenshot(page, "dashboard-first-login")
        page.click("text=Log out")
        page.wait_for_url("**/login")
        page.goto(f"{web.url}/api/me")
        assert "not authenticated" in page.inner_text("body")
        page.context.close()
