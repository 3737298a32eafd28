"""GraphiQL works on a machine with no network: `orgwallet serve` serves its page and every
script and style it needs, and a real browser (Debian's Chromium, every request that leaves the
server refused) loads it, runs a query with the token typed into its headers, and shows the
answer."""

from __future__ import annotations

import json

import httpx
from fastapi import FastAPI

from orgwallet.auth.tokens import mint_token
from orgwallet.config import Settings
from tests.payments.test_browser import CHROMIUM, CHROMIUM_FLAGS, JWT_SECRET, Served
from tests.payments.test_browser import served as served  # the fixture: `orgwallet serve`


async def test_graphiql_runs_a_query_with_the_network_cut_off(served: Served) -> None:
    from playwright.async_api import Route, async_playwright
    from playwright.async_api import TimeoutError as PlaywrightTimeout

    token = mint_token(Settings(jwt_secret=JWT_SECRET), subject="explorer", email=None, admin=False)
    refused: list[str] = []

    async def only_the_server(route: Route) -> None:
        if route.request.url.startswith(served.base):
            await route.continue_()
        else:
            refused.append(route.request.url)
            await route.abort("internetdisconnected")

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            context = await browser.new_context()
            await context.route("**/*", only_the_server)
            headers = json.dumps({"Authorization": f"Bearer {token}"})
            await context.add_init_script(f"localStorage.setItem('graphiql:headers', {json.dumps(headers)});")
            page = await context.new_page()
            await page.goto(f"{served.base}/graphql")
            await page.wait_for_selector(".graphiql-execute-button", timeout=30_000)
            await page.click(".graphiql-execute-button")
            response = page.locator(".graphiql-response")
            try:
                await response.get_by_text('"subject": "explorer"').wait_for(timeout=30_000)
            except PlaywrightTimeout:
                raise AssertionError(f"GraphiQL shows: {await response.inner_text()}") from None
        finally:
            await browser.close()
    assert refused == [], f"GraphiQL asked for outside resources: {refused}"


async def test_graphiql_assets_are_served_from_the_package(app: FastAPI) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        page = await http.get("/graphql", headers={"Accept": "text/html"})
        assert page.status_code == 200
        assert "unpkg.com" not in page.text and "cdn" not in page.text.lower()
        for asset in (
            "react.production.min.js",
            "graphiql.min.js",
            "graphiql.min.css",
            "plugin-explorer.umd.js",
        ):
            assert f"/_graphiql/{asset}" in page.text
            served = await http.get(f"/_graphiql/{asset}")
            assert served.status_code == 200 and len(served.content) > 500, asset
