"""The simulator's hosted pages, as Stripe's show them: Checkout (payment, setup and subscription
modes) with the test card ready, the simulator's own "payment received", "subscribed" and
"payment cancelled" pages (for a ``success_url``/``cancel_url`` that has nowhere else to go),
receipts, and hosted invoices (``invoice.hosted_invoice_url``, payable while open).

Plain server-rendered HTML: no JavaScript, nothing loaded from elsewhere (they work offline),
readable on a phone. Every value that comes from a request or an object is escaped; a page
shows only the object it belongs to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import Any

from orgwallet.money import format_amount
from orgwallet.payments.simulator import cards

DEFAULT_BUSINESS_NAME = "orgwallet"
#: What the card form holds when the page opens: Stripe's card that always succeeds, a date in
#: the future and any CVC (the simulator reads only the number, as Stripe's test mode does).
READY_CARD = "4242 4242 4242 4242"
READY_EXPIRY = "12 / 34"
READY_CVC = "123"
#: The other test cards offered one click away, in this order (what each does: ``cards``).
OTHER_TEST_CARDS = (
    "4000000000000002",
    "4000000000009995",
    "4000000000000069",
    "4000000000000127",
    "4000000000000119",
    "4000002760003184",
    "4000000000000341",
)
#: The invoices the hosted invoice page lets a person pay, as Stripe's does.
PAYABLE_INVOICE_STATUSES = frozenset({"open", "uncollectible"})

_STYLE = """
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; background: #f6f9fc; color: #1a1f36;
       margin: 0; line-height: 1.45; }
main { max-width: 460px; margin: 32px auto; background: #fff; padding: 28px; border-radius: 8px;
       box-shadow: 0 2px 8px rgba(0,0,0,.08); }
@media (max-width: 500px) { main { margin: 0; border-radius: 0; padding: 20px 16px; box-shadow: none; } }
header { display: flex; justify-content: space-between; align-items: center; margin-bottom: 20px; gap: 8px; }
.merchant { font-weight: 600; font-size: 16px; overflow-wrap: anywhere; }
.badge { background: #ffde92; color: #5a3d00; font-size: 12px; font-weight: 600; padding: 2px 8px;
         border-radius: 4px; white-space: nowrap; }
h1 { font-size: 20px; margin: 0 0 4px; }
.amount { font-size: 32px; font-weight: 600; margin: 4px 0 16px; }
.muted, .hint { color: #697386; font-size: 13px; }
table { width: 100%; border-collapse: collapse; margin: 8px 0 16px; }
td { padding: 6px 0; vertical-align: top; border-bottom: 1px solid #e3e8ee; overflow-wrap: anywhere; }
td.r { text-align: right; white-space: nowrap; padding-left: 12px; }
tr.total td { font-weight: 600; border-bottom: 0; }
dl { margin: 0 0 16px; } dt { color: #697386; font-size: 13px; margin-top: 10px; }
dd { margin: 0; overflow-wrap: anywhere; }
label { display: block; font-size: 14px; margin-bottom: 4px; }
input[type=text] { width: 100%; padding: 10px; font-size: 16px; border: 1px solid #ccd; border-radius: 4px;
                   margin-bottom: 12px; }
.row { display: flex; gap: 12px; } .row > div { flex: 1; }
button { width: 100%; padding: 12px; font-size: 16px; border: 0; border-radius: 4px; margin-bottom: 8px;
         cursor: pointer; }
.pay { background: #635bff; color: #fff; font-weight: 600; } .async { background: #e3e8ee; }
.cancel { background: none; color: #635bff; }
.error { background: #fde2e1; color: #8a1c1c; padding: 10px; border-radius: 4px; margin-bottom: 16px; }
details { margin: 8px 0 16px; } summary { cursor: pointer; color: #635bff; font-size: 14px; }
ul.cards { list-style: none; padding: 0; margin: 8px 0 0; }
ul.cards li { display: flex; align-items: center; gap: 8px; padding: 6px 0;
              border-bottom: 1px solid #e3e8ee; }
ul.cards li span { flex: 1; font-size: 13px; } ul.cards code { font-size: 13px; white-space: nowrap; }
ul.cards button { width: auto; margin: 0; padding: 6px 10px; font-size: 13px; background: #e3e8ee; }
a { color: #635bff; }
"""


@dataclass(frozen=True, slots=True)
class Page:
    title: str
    html: str
    status: int = 200


def _page(title: str, body: str, *, merchant: str, status: int = 200) -> Page:
    html = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<meta name='robots' content='noindex'>"
        f"<title>{escape(title)} · {escape(merchant)}</title><style>{_STYLE}</style></head>"
        f"<body><main><header><span class='merchant' id='merchant'>{escape(merchant)}</span>"
        "<span class='badge' id='test-mode'>TEST MODE</span></header>"
        f"{body}</main></body></html>"
    )
    return Page(title, html, status)


def message_page(
    title: str, message: str, *, merchant: str = DEFAULT_BUSINESS_NAME, status: int = 200
) -> Page:
    return _page(title, f"<h1>{escape(title)}</h1><p>{escape(message)}</p>", merchant=merchant, status=status)


def not_found(what: str, *, merchant: str = DEFAULT_BUSINESS_NAME) -> Page:
    return message_page("Not found", f"There is no such {what}.", merchant=merchant, status=404)


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _metadata(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    metadata = obj.get("metadata")
    return metadata if isinstance(metadata, Mapping) else {}


def _money(amount: object, currency: object) -> str:
    return format_amount(amount if isinstance(amount, int) else 0, _text(currency) or "usd")


def _date(timestamp: object) -> str:
    if not isinstance(timestamp, int):
        return ""
    at = datetime.fromtimestamp(timestamp, UTC)
    return f"{at.day} {at:%B %Y, %H:%M} UTC"


def _customer(session: Mapping[str, Any]) -> str:
    """Who pays, as Stripe's page shows it: the customer's name, else its e-mail."""
    details = session.get("customer_details")
    details = details if isinstance(details, Mapping) else {}
    return _text(details.get("name")) or _text(details.get("email")) or _text(session.get("customer_email"))


def _tokens(obj: Mapping[str, Any]) -> int | None:
    """The tokens a payment buys, as our app puts them in its metadata."""
    raw = _metadata(obj).get("tokens")
    return int(raw) if isinstance(raw, str) and raw.isdigit() else None


def _card_outcome(number: str) -> str:
    """What a test card does, in a few words (from ``cards``, which decides it)."""
    card = cards.lookup(number)
    if card.decline is not None:
        reason = (card.decline.decline_code or card.decline.code).replace("_", " ")
        if card.declines_when_saved:
            return f"declined: {reason}"
        return f"saves, then every charge is declined ({reason})"
    if card.off_session_decline is not None:
        return "succeeds here; charged later without you, asks for authentication"
    return "succeeds"


def _grouped(number: str) -> str:
    return " ".join(number[i : i + 4] for i in range(0, len(number), 4))


def _other_test_cards() -> str:
    """The other test cards, each a button that pays with it (the form's ``test_card``)."""
    return "".join(
        f"<li><code>{_grouped(number)}</code><span>{escape(_card_outcome(number))}</span>"
        f"<button type='submit' name='test_card' value='{number}'>Use</button></li>"
        for number in OTHER_TEST_CARDS
    )


def _card_fields(card_number: str | None) -> str:
    """The card form's inputs, ready with the card that succeeds (``card_number``: what was
    typed, when a try failed)."""
    typed = READY_CARD if card_number is None else card_number
    return f"""<label for='card_number'>Card number</label>
  <input type='text' id='card_number' name='card_number' inputmode='numeric' autocomplete='cc-number'
         value='{escape(typed)}'>
  <div class='row'>
    <div><label for='expiry'>Expiry</label>
      <input type='text' id='expiry' name='expiry' autocomplete='cc-exp' value='{READY_EXPIRY}'></div>
    <div><label for='cvc'>CVC</label>
      <input type='text' id='cvc' name='cvc' inputmode='numeric' autocomplete='cc-csc'
             value='{READY_CVC}'></div>
  </div>"""


def _every(recurring: object) -> str:
    """A price's interval as Stripe's pages say it: "month", "3 months"."""
    if not isinstance(recurring, Mapping):
        return ""
    count = recurring.get("interval_count")
    interval = _text(recurring.get("interval"))
    return interval if count == 1 else f"{count} {interval}s"


def _period(line: Mapping[str, Any]) -> str:
    period = line.get("period")
    if not isinstance(period, Mapping) or period.get("start") == period.get("end"):
        return ""
    return f"{_day(period.get('start'))} to {_day(period.get('end'))}"


def _day(timestamp: object) -> str:
    if not isinstance(timestamp, int):
        return ""
    at = datetime.fromtimestamp(timestamp, UTC)
    return f"{at.day} {at:%b %Y}"


def checkout_page(
    session: Mapping[str, Any],
    items: list[Mapping[str, Any]],
    *,
    merchant: str,
    error: str | None = None,
    card_number: str | None = None,
    status: int = 200,
) -> Page:
    """An open Checkout Session: what is bought, by whom, and the card form, ready with the
    card that succeeds (``card_number``: what was typed, when a try failed)."""
    setup = session.get("mode") == "setup"
    customer = _customer(session)
    who = f"<p class='muted' id='customer'>For {escape(customer)}</p>" if customer else ""
    if session.get("mode") == "subscription":
        heading, summary, pay_label = _subscription_summary(session, items, merchant, who)
    elif setup:
        heading = (
            f"<h1>Save a card with {escape(merchant)}</h1>{who}"
            "<p class='muted'>Nothing is charged now: the card is charged later, when you buy tokens.</p>"
        )
        summary = ""
        pay_label = "Save card"
    else:
        total = _money(session.get("amount_total"), session.get("currency"))
        heading = f"<h1>Pay {escape(merchant)}</h1><div class='amount' id='amount'>{escape(total)}</div>{who}"
        rows = "".join(
            f"<tr><td class='product'>{escape(_text(item.get('description')))}"
            f"{' &times; ' + escape(str(item.get('quantity'))) if item.get('quantity') != 1 else ''}</td>"
            f"<td class='r'>{escape(_money(item.get('amount_total'), item.get('currency')))}</td></tr>"
            for item in items
        )
        total_row = f"<tr class='total'><td>Total</td><td class='r'>{escape(total)}</td></tr>"
        summary = f"<table id='items'>{rows}{total_row}</table>"
        pay_label = f"Pay {total}"
    error_html = f"<div class='error' role='alert' id='error'>{escape(error)}</div>" if error else ""
    bank_debit = (
        "<button class='async' type='submit' name='action' value='pay_async' id='pay_async'>"
        "Pay by bank debit (test account, settles later)</button>"
        if session.get("mode") == "payment"
        and "us_bank_account" in (session.get("payment_method_types") or [])
        else ""
    )
    body = f"""{heading}
{summary}
{error_html}
<form method='post'>
  {_card_fields(card_number)}
  <button class='pay' type='submit' name='action' value='pay' id='pay'>{escape(pay_label)}</button>
  {bank_debit}
  <details id='test-cards'><summary>Other test cards</summary>
    <ul class='cards'>{_other_test_cards()}</ul>
    <button class='async' type='submit' name='action' value='decline' id='decline'>
      Decline (test card 4000 0000 0000 0002)</button>
  </details>
  <button class='cancel' type='submit' name='action' value='cancel' id='cancel'>Cancel</button>
</form>
<p class='hint'>Test mode: no real card is charged. Any future expiry date and any CVC work.</p>"""
    return _page("Save a card" if setup else "Checkout", body, merchant=merchant, status=status)


def _subscription_summary(
    session: Mapping[str, Any], items: list[Mapping[str, Any]], merchant: str, who: str
) -> tuple[str, str, str]:
    """A subscription-mode session's heading, plan table and button: the plan, its price per
    interval, and what is charged now."""
    total = _money(session.get("amount_total"), session.get("currency"))
    every = _every(items[0].get("price", {}).get("recurring")) if items else ""
    plan = " + ".join(_text(item.get("description")) for item in items)
    heading = (
        f"<h1>Subscribe to {escape(plan or merchant)}</h1>"
        f"<div class='amount' id='amount'>{escape(total)} "
        f"<span class='muted'>per {escape(every)}</span></div>"
        f"{who}"
    )
    rows = "".join(
        f"<tr><td class='product'>{escape(_text(item.get('description')))}"
        f"{' &times; ' + escape(str(item.get('quantity'))) if item.get('quantity') != 1 else ''}"
        f"<div class='muted'>Billed every {escape(_every(item.get('price', {}).get('recurring')))}</div></td>"
        f"<td class='r'>{escape(_money(item.get('amount_total'), item.get('currency')))}</td></tr>"
        for item in items
    )
    summary = (
        f"<table id='items'>{rows}<tr class='total'><td>Total due today</td>"
        f"<td class='r'>{escape(total)}</td></tr></table>"
        f"<p class='muted' id='terms'>Then {escape(total)} every {escape(every)} until you cancel.</p>"
    )
    return heading, summary, "Subscribe"


def subscribed_page(
    session: Mapping[str, Any],
    *,
    merchant: str,
    subscription: Mapping[str, Any],
    invoice: Mapping[str, Any],
) -> Page:
    """Where a subscription-mode ``success_url`` may land: the plan, what was paid, the next
    renewal, and the first invoice."""
    item = (subscription.get("items", {}).get("data") or [{}])[0]
    price = item.get("price") or {}
    line = (invoice.get("lines", {}).get("data") or [{}])[0]
    customer = _customer(session)
    renews = (
        f"{_date(item.get('current_period_end'))}: "
        f"{_money(price.get('unit_amount'), price.get('currency'))} every {_every(price.get('recurring'))}"
    )
    facts = [
        ("Plan", _text(line.get("description"))),
        ("Paid", _money(invoice.get("amount_paid"), invoice.get("currency"))),
        ("Renews", renews),
    ]
    if customer:
        facts.append(("For", customer))
    rows = "".join(
        f"<dt>{escape(name)}</dt><dd id='{name.lower()}'>{escape(value)}</dd>" for name, value in facts
    )
    link = _text(invoice.get("hosted_invoice_url"))
    invoice_link = f"<p><a id='invoice' href='{escape(link)}'>View the invoice</a></p>" if link else ""
    body = f"<h1>Subscribed</h1><dl>{rows}</dl>{invoice_link}"
    return _page("Subscribed", body, merchant=merchant)


def invoice_page(
    invoice: Mapping[str, Any],
    *,
    merchant: str,
    error: str | None = None,
    card_number: str | None = None,
    status: int = 200,
) -> Page:
    """A finalized invoice, as Stripe's hosted invoice page: number, status, lines with their
    periods, totals, and, while it can be paid, the card form ready with the card that succeeds."""
    currency = invoice.get("currency")
    state = _text(invoice.get("status"))
    transitions = invoice.get("status_transitions")
    transitions = transitions if isinstance(transitions, Mapping) else {}
    payable = state in PAYABLE_INVOICE_STATUSES
    remaining = _money(invoice.get("amount_remaining"), currency)
    if state == "paid":
        headline = f"Paid {_date(transitions.get('paid_at'))}"
        amount = _money(invoice.get("amount_paid"), currency)
    elif state == "void":
        headline, amount = "Void: nothing is due", _money(invoice.get("total"), currency)
    elif state == "uncollectible":
        headline, amount = "Overdue", remaining
    else:
        headline, amount = "Due now", remaining
    customer = _text(invoice.get("customer_name")) or _text(invoice.get("customer_email"))
    lines = invoice.get("lines")
    lines = lines.get("data") if isinstance(lines, Mapping) else []
    rows = "".join(
        f"<tr><td>{escape(_text(line.get('description')))}"
        f"<div class='muted'>{escape(_period(line))}</div></td>"
        f"<td class='r'>{escape(_money(line.get('amount'), currency))}</td></tr>"
        for line in lines or []
        if isinstance(line, Mapping)
    )
    totals = [("Total", _money(invoice.get("total"), currency))]
    balance = invoice.get("starting_balance")
    if isinstance(balance, int) and balance != 0:
        totals.append(("Applied balance", _money(balance, currency)))
    totals.append(("Amount due", _money(invoice.get("amount_due"), currency)))
    if invoice.get("amount_paid"):
        totals.append(("Amount paid", _money(invoice.get("amount_paid"), currency)))
    total_rows = "".join(
        f"<tr class='total'><td>{escape(name)}</td><td class='r' id='{name.lower().replace(' ', '-')}'>"
        f"{escape(value)}</td></tr>"
        for name, value in totals
    )
    facts = [("Invoice number", _text(invoice.get("number"))), ("Status", state)]
    if customer:
        facts.append(("Billed to", customer))
    attempts = invoice.get("attempt_count")
    if payable and isinstance(attempts, int) and attempts > 0:
        retry = invoice.get("next_payment_attempt")
        note = f"{attempts} failed attempt{'s' if attempts > 1 else ''}"
        facts.append(("Payment", f"{note}; next try {_date(retry)}" if isinstance(retry, int) else note))
    facts_html = "".join(
        f"<dt>{escape(name)}</dt><dd id='{name.lower().replace(' ', '-')}'>{escape(value)}</dd>"
        for name, value in facts
    )
    error_html = f"<div class='error' role='alert' id='error'>{escape(error)}</div>" if error else ""
    form = (
        f"""<form method='post'>
  {_card_fields(card_number)}
  <button class='pay' type='submit' name='action' value='pay' id='pay'>Pay {escape(remaining)}</button>
  <details id='test-cards'><summary>Other test cards</summary>
    <ul class='cards'>{_other_test_cards()}</ul>
  </details>
</form>
<p class='hint'>Test mode: no real card is charged. Any future expiry date and any CVC work.</p>"""
        if payable
        else "<p class='hint'>Test mode: no real money moved.</p>"
    )
    body = (
        f"<h1>Invoice from {escape(merchant)}</h1><div class='amount' id='amount'>{escape(amount)}</div>"
        f"<p id='headline'>{escape(headline)}</p><dl>{facts_html}</dl>"
        f"<table id='lines'>{rows}{total_rows}</table>{error_html}{form}"
    )
    return _page(f"Invoice {_text(invoice.get('number'))}", body, merchant=merchant, status=status)


def closed_checkout_page(session: Mapping[str, Any], *, merchant: str, status: int = 200) -> Page:
    """A Checkout Session that can no longer be paid (complete or expired)."""
    if session.get("status") == "expired":
        return message_page(
            "Expired", "This checkout session has expired: start again.", merchant=merchant, status=410
        )
    return message_page(
        "Already complete", "This checkout session is complete.", merchant=merchant, status=status
    )


def done_page(
    session: Mapping[str, Any],
    *,
    merchant: str,
    charge: Mapping[str, Any] | None,
    payment_method: Mapping[str, Any] | None,
) -> Page:
    """Where the README's ``success_url`` lands: what this one session did."""
    customer = _customer(session)
    status = session.get("status")
    if status == "open":
        return message_page(
            "Not paid yet", "This checkout session is still open: nothing was paid.", merchant=merchant
        )
    if status != "complete":
        return closed_checkout_page(session, merchant=merchant)
    if session.get("mode") == "setup":
        card = payment_method.get("card") if payment_method else None
        saved = (
            f"{_text(card.get('brand')).title()} ending in {_text(card.get('last4'))}"
            if isinstance(card, Mapping)
            else "The card"
        )
        body = (
            f"<h1>Card saved</h1><p id='saved'>{escape(saved)} is saved"
            f"{' for ' + escape(customer) if customer else ''}.</p>"
            "<p class='muted'>It is charged when tokens are bought with the saved card.</p>"
        )
        return _page("Card saved", body, merchant=merchant)
    tokens = _tokens(session)
    metadata = _metadata(session)
    total = _money(session.get("amount_total"), session.get("currency"))
    paid = session.get("payment_status") == "paid"
    facts = [("Amount", total)]
    if tokens is not None:
        facts.append(("Tokens", f"{tokens:,}"))
    if customer:
        facts.append(("For", customer))
    if _text(metadata.get("reference")):
        facts.append(("Reference", _text(metadata.get("reference"))))
    rows = "".join(
        f"<dt>{escape(name)}</dt><dd id='{name.lower()}'>{escape(value)}</dd>" for name, value in facts
    )
    receipt = _text(charge.get("receipt_url")) if charge else ""
    receipt_link = f"<p><a id='receipt' href='{escape(receipt)}'>View the receipt</a></p>" if receipt else ""
    what = f"{tokens:,} tokens" if tokens is not None else "The tokens"
    if paid:
        heading = "<h1>Payment received</h1>"
        note = f"{what}{' for ' + customer if customer else ''}: they are added to the wallet in a moment."
    else:
        heading = "<h1>Payment processing</h1>"
        note = f"The bank debit settles later: {what}{' for ' + customer if customer else ''} are added then."
    body = f"{heading}<p id='summary'>{escape(note)}</p><dl>{rows}</dl>{receipt_link}"
    return _page("Payment received" if paid else "Payment processing", body, merchant=merchant)


def cancelled_page(*, merchant: str) -> Page:
    """Where the README's ``cancel_url`` lands (Stripe puts no session id in it)."""
    return message_page(
        "Payment cancelled",
        "You left the checkout page: nothing was charged. You can start a new purchase at any time.",
        merchant=merchant,
    )


def receipt_page(
    charge: Mapping[str, Any],
    *,
    merchant: str,
    customer: Mapping[str, Any] | None = None,
    refunds: Sequence[Mapping[str, Any]] = (),
) -> Page:
    """The receipt behind ``charge.receipt_url``: merchant, date, reference, amount, tokens,
    the card (last four digits) and each refund."""
    currency = charge.get("currency")
    amount = _money(charge.get("amount"), currency)
    metadata = _metadata(charge)
    tokens = _tokens(charge)
    details = charge.get("payment_method_details")
    details = details if isinstance(details, Mapping) else {}
    card = details.get("card")
    bank = details.get("us_bank_account")
    if isinstance(card, Mapping):
        method = f"{_text(card.get('brand')).title()} ending in {_text(card.get('last4'))}"
    elif isinstance(bank, Mapping):
        method = f"Bank account ending in {_text(bank.get('last4'))}"
    else:
        method = ""
    facts = [("Amount paid", amount), ("Date paid", _date(charge.get("created")))]
    if _text(metadata.get("reference")):
        facts.append(("Reference", _text(metadata.get("reference"))))
    if tokens is not None:
        facts.append(("Tokens", f"{tokens:,}"))
    if _text(charge.get("description")):
        facts.append(("Description", _text(charge.get("description"))))
    if customer and (_text(customer.get("name")) or _text(customer.get("email"))):
        facts.append(("Customer", _text(customer.get("name")) or _text(customer.get("email"))))
    if method:
        facts.append(("Payment method", method))
    refunded = charge.get("amount_refunded")
    if isinstance(refunded, int) and refunded > 0:
        whole = refunded >= (charge.get("amount") or 0)
        facts.append(("Refunded", f"{_money(refunded, currency)}{' (in full)' if whole else ''}"))
    facts.append(("Receipt", _text(charge.get("id"))))
    rows = "".join(
        f"<dt>{escape(name)}</dt><dd id='{name.lower().replace(' ', '-')}'>{escape(value)}</dd>"
        for name, value in facts
    )
    refund_rows = "".join(
        f"<tr><td>Refund, {escape(_date(refund.get('created')))}</td>"
        f"<td class='r'>&minus;{escape(_money(refund.get('amount'), refund.get('currency')))}</td></tr>"
        for refund in refunds
    )
    refund_table = f"<table id='refunds'>{refund_rows}</table>" if refund_rows else ""
    body = (
        f"<h1>Receipt from {escape(merchant)}</h1><div class='amount' id='amount'>{escape(amount)}</div>"
        f"<dl>{rows}</dl>{refund_table}<p class='hint'>Test mode: no real money moved.</p>"
    )
    return _page("Receipt", body, merchant=merchant)
