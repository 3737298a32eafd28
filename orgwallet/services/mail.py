"""E-mail of notifications: one ``emails`` row per notification and recipient, sent by the
``mail.send`` job, retried with back-off by the ``mail.retry`` duty.

Transports: SMTP when ``ORGWALLET_SMTP_URL`` is set (aiosmtplib: asyncio-native, STARTTLS
and implicit TLS, well kept); otherwise the outbox: the row is the mail, kept for the
development page ``/_mail``. Sending happens with no transaction open (the row is read, then
the connection given back, then the mail server is called, then the outcome written). A mail
server that is down loses nothing: the row stays pending with its next attempt time, taken
from the runtime's clock. Delivery is at least once (a worker killed between the server's
answer and the row's update sends again); the Message-ID is the row's, so a receiving system
can tell a copy.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import aiosmtplib

from orgwallet.config import Settings
from orgwallet.db.engine import DriverPool, assert_no_transaction

log = logging.getLogger(__name__)

#: Back-off after the n-th failed attempt (the last figure repeats); then the mail is FAILED.
RETRY_DELAYS = (
    timedelta(minutes=1),
    timedelta(minutes=5),
    timedelta(minutes=15),
    timedelta(hours=1),
    timedelta(hours=6),
)
MAX_ATTEMPTS = 10


class MailTransport(Protocol):
    @property
    def name(self) -> str: ...

    async def send(self, message: EmailMessage) -> None: ...


class OutboxTransport:
    """No mail server: the ``emails`` row is the mail, shown on ``/_mail``."""

    name = "outbox"

    async def send(self, message: EmailMessage) -> None:
        return None


@dataclass(frozen=True)
class SmtpTransport:
    """``smtp://[user:password@]host[:port]`` (STARTTLS when the server offers it) or
    ``smtps://...`` (TLS from the start, port 465 by default)."""

    url: str
    timeout: float = 30.0
    name: str = "smtp"

    async def send(self, message: EmailMessage) -> None:
        assert_no_transaction("SMTP send")
        parts = urlsplit(self.url)
        implicit_tls = parts.scheme == "smtps"
        await aiosmtplib.send(
            message,
            hostname=parts.hostname or "localhost",
            port=parts.port or (465 if implicit_tls else 25),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            use_tls=implicit_tls,
            start_tls=False if implicit_tls else None,
            timeout=self.timeout,
        )


def transport_for(settings: Settings) -> MailTransport:
    if settings.smtp_url:
        scheme = urlsplit(settings.smtp_url).scheme
        if scheme not in ("smtp", "smtps"):
            raise ValueError("ORGWALLET_SMTP_URL must start with smtp:// or smtps://")
        return SmtpTransport(settings.smtp_url, timeout=settings.smtp_timeout_seconds)
    return OutboxTransport()


def retry_delay(attempts: int) -> timedelta:
    return RETRY_DELAYS[min(attempts, len(RETRY_DELAYS)) - 1]


_PENDING = """
    SELECT id, to_address, subject, body, attempts, next_attempt_at, created_at
    FROM emails WHERE id = $1 AND status = 'pending'
"""
_SENT = """
    UPDATE emails SET status = 'sent', transport = $2, sent_at = $3, attempts = attempts + 1,
                      last_error = NULL
    WHERE id = $1 AND status = 'pending'
"""
_FAILED = """
    UPDATE emails SET attempts = attempts + 1, last_error = $2, next_attempt_at = $3,
                      status = CASE WHEN attempts + 1 >= $4 THEN 'failed' ELSE 'pending' END
    WHERE id = $1 AND status = 'pending'
"""


def message_of(row: Any, sender: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = row["to_address"]
    message["Subject"] = row["subject"]
    message["Date"] = formatdate(row["created_at"].timestamp(), usegmt=True)
    message["Message-ID"] = f"<{row['id']}@orgwallet>"
    message.set_content(row["body"])
    return message


async def send_email(
    driver: DriverPool, transport: MailTransport, sender: str, email_id: uuid.UUID, now: datetime
) -> str:
    """Sends one pending e-mail if it is due: 'sent', 'retry' (failed, will be retried),
    'not_due', or 'done' (sent or given up already)."""
    async with driver.acquire() as connection:
        row = await connection.fetchrow(_PENDING, email_id)
    if row is None:
        return "done"
    # The first attempt goes at once; a retry waits for its time (the mail.retry duty).
    if row["attempts"] > 0 and row["next_attempt_at"] > now:
        return "not_due"
    try:
        await transport.send(message_of(row, sender))
    except Exception as error:
        attempts = row["attempts"] + 1
        reason = f"{type(error).__name__}: {error}"[:1000]
        log.warning("e-mail %s to %s failed (attempt %d): %s", email_id, row["to_address"], attempts, reason)
        async with driver.acquire() as connection:
            await connection.execute(_FAILED, email_id, reason, now + retry_delay(attempts), MAX_ATTEMPTS)
        return "retry"
    async with driver.acquire() as connection:
        await connection.execute(_SENT, email_id, transport.name, now)
    return "sent"


async def due_emails(driver: DriverPool, now: datetime, limit: int = 1000) -> list[uuid.UUID]:
    """Pending e-mails whose retry is due."""
    async with driver.acquire() as connection:
        rows = await connection.fetch(
            "SELECT id FROM emails WHERE status = 'pending' AND next_attempt_at <= $1 "
            "ORDER BY next_attempt_at LIMIT $2",
            now,
            limit,
        )
    return [r["id"] for r in rows]


async def outbox(driver: DriverPool, limit: int = 200) -> list[Any]:
    """The newest e-mails, for the development page."""
    async with driver.acquire() as connection:
        return list(
            await connection.fetch(
                "SELECT id, to_address, subject, body, status, transport, attempts, last_error, "
                "created_at, sent_at FROM emails ORDER BY id DESC LIMIT $1",
                limit,
            )
        )
