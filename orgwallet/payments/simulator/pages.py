"""The simulator's hosted pages: Checkout (no JavaScript, no external assets) and receipts."""

from __future__ import annotations

from html import escape
from typing import Any

from orgwallet.money import format_amount

_STYLE = """
body { font-family: system-ui, sans-serif; background: #f6f9fc; color: #1a1f36; margin: 0; }
main { max-width: 420px; margin: 48px auto; background: #fff; padding: 32px; border-radius: 8px;
       box-shadow: 0 2px 8px rgba(0,0,0,.08); }
h1 { font-size: 20px; margin: 0 0 4px; } .amount { font-size: 32px; font-weight: 600; margin: 8px 0 24px; }
.badge { display: inline-block; background: #ffde92; color: #5a3d00; font-size: 12px; padding: 2px 8px;
         border-radius: 4px; } table { width: 100%; margin-bottom: 16px; } td.r { text-align: right; }
label { display: block; font-size: 14px; margin-bottom: 4px; }
input[type=text] { width: 100%; box-sizing: border-box; padding: 10px; font-size: 16px;
                   border: 1px solid #ccd; border-radius: 4px; margin-bottom: 16px; }
button { width: 100%; padding: 12px; font-size: 16px; border: 0; border-radius: 4px; margin-bottom: 8px;
         cursor: pointer; } .pay { background: #635bff; color: #fff; } .decline { background: #fde2e1; }
.async { background: #e3e8ee; } .cancel { background: none; color: #635bff; }
.error { background: #fde2e1; color: #8a1c1c; padding: 10px; border-radius: 4px; margin-bottom: 16px; }
.hint { color: #697386; font-size: 12px; }
"""


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><main><span class='badge'>TEST MODE · Stripe simulator</span>{body}</main></body></html>"
    )


def message_page(title: str, message: str) -> str:
    return _page(title, f"<h1>{escape(title)}</h1><p>{escape(message)}</p>")


def checkout_page(
    session: dict[str, Any], items: list[dict[str, Any]], *, error: str | None, card_number: str
) -> str:
    setup = session["mode"] == "setup"
    if setup:
        heading = "<h1>Save a card</h1><p>It will be charged later, when you buy tokens.</p>"
        rows = ""
    else:
        total = format_amount(session["amount_total"], session["currency"])
        heading = f"<h1>Pay</h1><div class='amount' id='amount'>{escape(total)}</div>"
        rows = "".join(
            f"<tr><td class='product'>{escape(str(item['description']))}"
            f"{' &times; ' + str(item['quantity']) if item['quantity'] != 1 else ''}</td>"
            f"<td class='r'>{escape(format_amount(item['amount_total'], item['currency']))}</td></tr>"
            for item in items
        )
    error_html = f"<div class='error' role='alert' id='error'>{escape(error)}</div>" if error else ""
    async_button = (
        ""
        if setup or "us_bank_account" not in session["payment_method_types"]
        else "<button class='async' type='submit' name='action' value='pay_async'>"
        "Pay by bank debit (settles later)</button>"
    )
    pay_label = "Save card" if setup else "Pay"
    body = f"""{heading}
<table>{rows}</table>
{error_html}
<form method='post'>
  <label for='card_number'>Card number</label>
  <input type='text' id='card_number' name='card_number' inputmode='numeric' autocomplete='cc-number'
         placeholder='4242 4242 4242 4242' value='{escape(card_number)}'>
  <p class='hint'>4242 4242 4242 4242 succeeds · 4000 0000 0000 0002 is declined ·
     4000 0000 0000 0341 saves but declines later</p>
  <button class='pay' type='submit' name='action' value='pay' id='pay'>{pay_label}</button>
  <button class='decline' type='submit' name='action' value='decline' id='decline'>
    Decline (test card 0002)</button>
  {async_button}
  <button class='cancel' type='submit' name='action' value='cancel' id='cancel'>Cancel</button>
</form>"""
    return _page("Checkout", body)


def receipt_page(charge: dict[str, Any]) -> str:
    amount = format_amount(charge["amount"], charge["currency"])
    refunded = charge["amount_refunded"]
    refund_line = (
        f"<p>Refunded: {escape(format_amount(refunded, charge['currency']))}</p>" if refunded else ""
    )
    body = (
        f"<h1>Receipt</h1><div class='amount'>{escape(amount)}</div>"
        f"<p>Charge {escape(charge['id'])}</p><p>{escape(str(charge['description'] or ''))}</p>{refund_line}"
    )
    return _page("Receipt", body)
