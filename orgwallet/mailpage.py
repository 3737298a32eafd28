"""``/_mail``: the development outbox. With no SMTP server configured, e-mails are kept in the
``emails`` table instead of being sent; this page shows the newest of them, as they would have
been sent (recipient, subject, text), so a newcomer sees what orgwallet tells people. It is
not served when ``ORGWALLET_SMTP_URL`` is set (it shows every organization's mail)."""

from __future__ import annotations

from html import escape

from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from orgwallet.db.engine import DriverPool
from orgwallet.services import mail

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>orgwallet outbox</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }}
article {{ border: 1px solid #ddd; border-radius: 6px; padding: .8rem 1rem; margin: 1rem 0; }}
header {{ color: #555; font-size: 13px; }} pre {{ white-space: pre-wrap; font: inherit; }}
.status {{ float: right; font-size: 12px; text-transform: uppercase; }}
</style></head><body>
<h1>Outbox</h1>
<p>No SMTP server is configured (<code>ORGWALLET_SMTP_URL</code>), so e-mail is kept here
instead of being sent: the newest {count} messages.</p>
{articles}
</body></html>"""

_ARTICLE = """<article><span class="status">{status}</span>
<header>To {to} &middot; {created}</header><h2>{subject}</h2><pre>{body}</pre></article>"""


def outbox_route(driver: DriverPool) -> Route:
    async def outbox_page(request: Request) -> HTMLResponse:
        rows = await mail.outbox(driver)
        articles = "".join(
            _ARTICLE.format(
                status=escape(row["status"]),
                to=escape(row["to_address"]),
                created=escape(f"{row['created_at']:%Y-%m-%d %H:%M:%S} UTC"),
                subject=escape(row["subject"]),
                body=escape(row["body"]),
            )
            for row in rows
        )
        return HTMLResponse(_PAGE.format(count=len(rows), articles=articles or "<p>Nothing yet.</p>"))

    return Route("/_mail", outbox_page, methods=["GET"], include_in_schema=False)
