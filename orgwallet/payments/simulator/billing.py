"""Stripe Billing in the simulated account: Products and recurring Prices, Subscriptions, their
Invoices (each with a hosted page), a retry schedule for failed renewals, and test clocks.

``Billing`` is a part of ``core.Account`` (a mixin: the same records, sections and events). The
shapes are the pinned API version's (``STRIPE_API_VERSION``): a subscription's period is on its
items (``items.data[].current_period_start/end``), an invoice names its subscription in
``parent.subscription_details.subscription``, and its lines carry their own ``period``; for a
renewal, ``invoice.period_start/end`` is the period that ended (Stripe's "looks back one
period"), a line's ``period`` the one it pays for.

Time. An object lives in its customer's time: a test clock's ``frozen_time``, or else the
simulator's own ``clock``. What falls due (a reminder, a renewal, the finalization of a
renewal's draft an hour later, a payment retry, an incomplete subscription expiring) is done at
the instant it was due, in order, each with its events: for a test clock when it is advanced
past it (several periods in one advance, up to Stripe's limit of two intervals of the clock's
shortest subscription), for the others at the start of the next section (any request), as
Stripe's own scheduler would have done meanwhile. Objects and events made then are stamped with
that instant.

A subscription's life, with Stripe's defaults where Stripe lets an account choose:

- Created (``subscriptions.create``, or Checkout in subscription mode): ``incomplete``, its
  first invoice (``subscription_create``) finalized and charged at once; paid, ``active``. An
  unpaid first invoice is not retried: after 23 hours the subscription is
  ``incomplete_expired`` and the invoice void. Checkout charges the card before it makes
  anything: a declined card is shown on the page, and nothing is created. The card paid with
  in Checkout becomes the subscription's ``default_payment_method`` (it outranks the
  customer's: the test control ``/test/customers/{id}/default_payment_method`` changes both, as
  Stripe's billing portal does).
- At each period end, a ``subscription_cycle`` invoice (a draft), finalized an hour later and
  charged to the default payment method: the subscription's, else the customer's
  ``invoice_settings.default_payment_method``. ``upcoming_invoice_days`` (3) days before, one
  ``invoice.upcoming`` per period (none when the subscription ends at that period end).
- A failed charge leaves the invoice ``open`` with ``attempt_count`` and
  ``next_payment_attempt``, and the subscription ``past_due``. It is retried
  ``payment_retry_days`` (3, 5, 7) days after each failure; when the last retry fails, the
  subscription is ``canceled`` (``cancellation_details.reason``: ``payment_failed``) and the
  invoice ``uncollectible``. Paid meanwhile (``invoices.pay``, the hosted invoice page, a retry
  with a new default payment method), or voided or marked uncollectible, the subscription is
  ``active`` again.
- ``subscriptions.update`` ``items``: ``proration_behavior`` ``create_prorations`` (the
  default) puts the prorations on the next renewal's invoice, ``always_invoice`` bills them
  now (``subscription_update``), ``none`` changes the price from the next renewal on. A change
  of interval restarts the period now, billed at once (credit for the unused time unless
  ``none``). Prorations are by the second, as Stripe's: an item changed at ``t`` in its period
  ``[start, end)`` is credited ``old * (end - t) / (end - start)`` and charged
  ``new * (end - t) / (end - start)``, each rounded to the nearest minor unit. A negative
  invoice becomes customer credit (``customer.balance``), taken off the next invoice.
- ``pause_collection``: renewals go on, their invoices voided, marked uncollectible or kept as
  drafts (``behavior``) until ``pause_collection=""`` or ``resumes_at``.
- ``cancel_at_period_end``: canceled when the period ends; ``subscriptions.cancel``: now
  (``prorate`` credits the unused time, billed on a final invoice with ``invoice_now``; without
  it the credit stays pending, never billed). Either way ``customer.subscription.deleted``; the
  subscription's open invoices are no longer retried, but may still be paid.

Not modelled: trials (and the ``paused`` status), metered or tiered prices, taxes, coupons,
``send_invoice`` collection, subscription schedules, ``pending_if_incomplete``. Deleting a test
clock deletes its customers; a deleted object is then "No such ..." (Stripe still answers a
stub with ``deleted: true``).
"""

from __future__ import annotations

import calendar
import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from orgwallet.money import format_amount
from orgwallet.payments.simulator.cards import Card, Decline
from orgwallet.payments.simulator.errors import StripeApiError
from orgwallet.payments.simulator.forms import (
    param_bool,
    param_dict,
    param_int,
    param_list,
    param_metadata,
    param_str,
)
from orgwallet.payments.simulator.objects import (
    MAX_AMOUNT,
    JsonObject,
    list_object,
    new_id,
    too_large,
    updated_metadata,
)

TEST_CLOCK = "test_helpers.test_clock"
DAY = 24 * 3600
TIMES = " \u00d7 "  # Stripe's line descriptions: "1 \u00d7 Pro (at $10.00 / month)"
UPCOMING_INVOICE_DAYS = 3
PAYMENT_RETRY_DAYS: tuple[int, ...] = (3, 5, 7)
FINALIZE_AFTER_SECONDS = 3600  # a renewal's draft is finalized and charged an hour later
INCOMPLETE_LIFETIME_SECONDS = 23 * 3600
CLOCK_LIFETIME_SECONDS = 30 * DAY
INTERVALS = ("day", "week", "month", "year")
#: The longest a price's period may be: three years.
MAX_INTERVAL_COUNT = {"day": 3 * 365, "week": 3 * 52, "month": 3 * 12, "year": 3}
ENDED = frozenset({"canceled", "incomplete_expired"})
PAYMENT_BEHAVIORS = frozenset({"allow_incomplete", "default_incomplete", "error_if_incomplete"})
PRORATION_BEHAVIORS = frozenset({"always_invoice", "create_prorations", "none"})
PAUSE_BEHAVIORS = frozenset({"keep_as_draft", "mark_uncollectible", "void"})
CANCELLATION_FEEDBACK = frozenset(
    {
        "customer_service",
        "low_quality",
        "missing_features",
        "other",
        "switched_service",
        "too_complex",
        "too_expensive",
        "unused",
    }
)
INVOICE_STATUSES = frozenset({"draft", "open", "paid", "uncollectible", "void"})
SUBSCRIPTION_STATUSES = frozenset(
    {"active", "canceled", "incomplete", "incomplete_expired", "past_due", "trialing", "unpaid"}
)
_PAYMENT_DESCRIPTIONS = {
    "subscription_create": "Subscription creation",
    "subscription_cycle": "Subscription cycle",
    "subscription_update": "Subscription update",
}
NO_PAYMENT_METHOD = Decline(
    "resource_missing", None, "This customer has no attached payment source or default payment method."
)
#: Due work on the simulator's own clock done in one section at most (the rest in the next ones:
#: a section stays short even after the simulator was left alone for months).
STEPS_PER_SECTION = 200

# The kinds of records billing adds to the account's (see ``core``).
SUBSCRIPTION_STATE = "subscription_state"  # subscription id -> reminders sent, pending prorations
CHECKOUT_SUBSCRIPTION = "checkout_subscription"  # checkout session id -> its subscription_data
INVOICE_PAYMENTS = "invoice_payments"  # invoice id -> its invoice_payment objects


def shifted(instant: int, interval: str, steps: int) -> int:
    """``instant`` moved ``steps`` intervals on; a month or year later keeps the day of the
    month, or takes the month's last day when it has no such day (as Stripe's billing cycle)."""
    if interval == "day":
        return instant + steps * DAY
    if interval == "week":
        return instant + steps * 7 * DAY
    at = datetime.fromtimestamp(instant, UTC)
    index = at.month - 1 + steps * (12 if interval == "year" else 1)
    year, month = at.year + index // 12, index % 12 + 1
    day = min(at.day, calendar.monthrange(year, month)[1])
    return int(at.replace(year=year, month=month, day=day).timestamp())


def period_end_after(anchor: int, recurring: JsonObject, after: int) -> int:
    """The first period end counted from the billing cycle ``anchor`` that is after ``after``."""
    interval, count = str(recurring["interval"]), int(recurring["interval_count"])
    longest = {"day": DAY, "week": 7 * DAY, "month": 31 * DAY, "year": 366 * DAY}[interval]
    steps = (max(0, (after - anchor) // (longest * count) - 1) + 1) * count
    while shifted(anchor, interval, steps) <= after:
        steps += count
    return shifted(anchor, interval, steps)


def prorated(amount: int, remaining: int, whole: int) -> int:
    """``amount * remaining / whole``, rounded half away from zero."""
    if whole <= 0:
        return 0
    magnitude = (abs(amount) * remaining * 2 + whole) // (2 * whole)
    return magnitude if amount >= 0 else -magnitude


def _interval_text(recurring: JsonObject) -> str:
    count = int(recurring["interval_count"])
    return str(recurring["interval"]) if count == 1 else f"{count} {recurring['interval']}s"


def _day(instant: int) -> str:
    at = datetime.fromtimestamp(instant, UTC)
    return f"{at.day} {at:%b %Y}"


def _changes(before: JsonObject, after: JsonObject) -> JsonObject:
    """Stripe's ``previous_attributes``: the top-level fields that changed, as they were."""
    return {key: before[key] for key in before if before[key] != after.get(key)}


def _optional_bool(params: JsonObject, name: str) -> bool | None:
    return None if params.get(name) in (None, "") else param_bool(params, name)


def _plan_of(price: JsonObject) -> JsonObject:
    """The legacy ``plan`` a subscription item still carries beside its ``price``."""
    recurring = price["recurring"]
    return {
        "id": price["id"],
        "object": "plan",
        "active": price["active"],
        "amount": price["unit_amount"],
        "amount_decimal": price["unit_amount_decimal"],
        "billing_scheme": "per_unit",
        "created": price["created"],
        "currency": price["currency"],
        "interval": recurring["interval"],
        "interval_count": recurring["interval_count"],
        "livemode": False,
        "metadata": dict(price["metadata"]),
        "meter": None,
        "nickname": price["nickname"],
        "product": price["product"],
        "tiers_mode": None,
        "transform_usage": None,
        "trial_period_days": None,
        "usage_type": "licensed",
    }


def _cycle_of(price: JsonObject) -> tuple[str, int]:
    return str(price["recurring"]["interval"]), int(price["recurring"]["interval_count"])


class Billing:
    """Stripe Billing's operations on the account; ``core.Account`` is one."""

    upcoming_invoice_days: int = UPCOMING_INVOICE_DAYS
    payment_retry_days: tuple[int, ...] = PAYMENT_RETRY_DAYS
    _frozen_at: int | None = None  # "now" while due work runs at the instant it was due

    if TYPE_CHECKING:  # what the account (``core``) provides
        public_base_url: str
        clock: Callable[[], float]
        _objects: dict[str, JsonObject]
        _records: dict[str, dict[str, Any]]
        _cards: dict[str, Card]
        _line_items: dict[str, list[JsonObject]]

        def _touch(self, kind: str, key: str) -> None: ...
        def _put(self, kind: str, key: str, value: Any) -> None: ...
        def _store(self, obj: JsonObject) -> JsonObject: ...
        def _get(self, object_id: str, object_name: str, *, param: str = "id") -> JsonObject: ...
        def _check(self) -> None: ...
        def _now(self) -> int: ...
        def _emit(
            self, event_type: str, obj: JsonObject, previous: JsonObject | None = None
        ) -> JsonObject: ...
        def _new_payment_intent(
            self,
            *,
            amount: int,
            currency: str,
            customer: str | None,
            metadata: dict[str, str],
            description: str | None,
            payment_method_types: list[str],
        ) -> JsonObject: ...
        def _charge(
            self, intent: JsonObject, payment_method: JsonObject, decline: Decline | None
        ) -> JsonObject: ...
        def _decline_error(self, decline: Decline, **objects: JsonObject | str) -> StripeApiError: ...
        def _new_card_payment_method(self, card: Card) -> JsonObject: ...
        def _attach(self, payment_method: JsonObject, customer_id: str) -> None: ...
        def _lookup_card(self, number: str) -> Card: ...
        def create_customer(self, params: JsonObject) -> JsonObject: ...
        def update_customer(self, customer_id: str, params: JsonObject) -> JsonObject: ...
        def add_test_card(self, customer_id: str, card_number: str) -> JsonObject: ...

    def _init_billing(self) -> None:
        self._subscription_states: dict[str, JsonObject] = {}
        self._checkout_subscriptions: dict[str, JsonObject] = {}
        self._invoice_payments: dict[str, list[JsonObject]] = {}
        self._records[SUBSCRIPTION_STATE] = self._subscription_states
        self._records[CHECKOUT_SUBSCRIPTION] = self._checkout_subscriptions
        self._records[INVOICE_PAYMENTS] = self._invoice_payments

    # -- time -----------------------------------------------------------------------------------

    @contextmanager
    def _at(self, instant: int) -> Iterator[None]:
        """Objects made and events emitted in the block are stamped ``instant``."""
        saved, self._frozen_at = self._frozen_at, instant
        try:
            yield
        finally:
            self._frozen_at = saved

    def _time_of(self, clock_id: str | None) -> int:
        """Now, in a test clock's time (``None``: the simulator's own clock)."""
        if clock_id is None:
            return int(self.clock())
        clock = self._objects.get(clock_id)
        return (
            int(clock["frozen_time"]) if clock is not None and not clock.get("deleted") else int(self.clock())
        )

    def _customer_test_clock(self, params: JsonObject) -> JsonObject | None:
        """The test clock a new customer lives in (``test_clock``), if any."""
        clock_id = param_str(params, "test_clock")
        return self._get(clock_id, TEST_CLOCK, param="test_clock") if clock_id is not None else None

    def run_due(self) -> None:
        """What has come due on the simulator's own clock (objects on no test clock), each done
        at the instant it was due. Every section starts with it."""
        self._run_due(None, int(self.clock()), limit=STEPS_PER_SECTION)

    def _run_due(self, world: str | None, until: int, *, limit: int | None = None) -> None:
        """Each step moves its object on (a period, an attempt, a status), so this ends; a test
        clock's advance is bounded by its two intervals."""
        done = 0
        while limit is None or done < limit:
            step = self._next_due(world, until)
            if step is None:
                return
            at, _order, action, object_id = step
            with self._at(at):
                action(object_id)
            done += 1

    def _next_due(self, world: str | None, until: int) -> tuple[int, int, Callable[[str], None], str] | None:
        """The earliest work due by ``until`` in a world (a test clock's id, or ``None``)."""
        found: list[tuple[int, int, Callable[[str], None], str]] = []
        for obj in self._objects.values():
            kind = obj.get("object")
            if kind not in ("invoice", "subscription") or obj.get("test_clock") != world:
                continue
            object_id = obj["id"]
            if kind == "invoice":
                if obj["status"] == "draft" and obj["auto_advance"] and obj["automatically_finalizes_at"]:
                    found.append((obj["automatically_finalizes_at"], 1, self._finalize_due, object_id))
                elif obj["status"] == "open" and obj["next_payment_attempt"] is not None:
                    found.append((obj["next_payment_attempt"], 2, self._retry_due, object_id))
                continue
            status = obj["status"]
            if status in ENDED:
                continue
            if status == "incomplete":
                found.append(
                    (obj["created"] + INCOMPLETE_LIFETIME_SECONDS, 5, self._expire_incomplete, object_id)
                )
                continue
            start, end = self._period(obj)
            pause = obj["pause_collection"]
            if pause is not None and pause.get("resumes_at") is not None:
                found.append((pause["resumes_at"], 3, self._resume_collection, object_id))
            remind_at = end - self.upcoming_invoice_days * DAY
            reminded = self._subscription_states.get(object_id, {}).get("reminded_for")
            if (
                self.upcoming_invoice_days > 0
                and not obj["cancel_at_period_end"]
                and start < remind_at
                and reminded != end
            ):
                found.append((remind_at, 0, self._remind, object_id))
            found.append((end, 4, self._renew, object_id))
        due = [step for step in found if step[0] <= until]
        return min(due, key=lambda step: (step[0], step[1], step[3])) if due else None

    # -- products and prices --------------------------------------------------------------------

    def create_product(self, params: JsonObject) -> JsonObject:
        name = param_str(params, "name", required=True)
        product_id = param_str(params, "id") or new_id("prod_", 14)
        if product_id in self._objects:
            raise StripeApiError(
                400, f"Product already exists: {product_id}", code="resource_already_exists", param="id"
            )
        active = _optional_bool(params, "active")
        now = self._now()
        product = self._store(
            {
                "id": product_id,
                "object": "product",
                "active": True if active is None else active,
                "created": now,
                "default_price": None,
                "description": param_str(params, "description"),
                "images": [],
                "livemode": False,
                "marketing_features": [],
                "metadata": param_metadata(params),
                "name": name,
                "package_dimensions": None,
                "shippable": None,
                "statement_descriptor": None,
                "tax_code": None,
                "type": "service",
                "unit_label": None,
                "updated": now,
                "url": None,
            }
        )
        self._emit("product.created", product)
        return copy.deepcopy(product)

    def update_product(self, product_id: str, params: JsonObject) -> JsonObject:
        product = self._get(product_id, "product")
        active = _optional_bool(params, "active")
        name = param_str(params, "name")
        metadata = updated_metadata(product["metadata"], params) if "metadata" in params else None
        before = copy.deepcopy(product)
        if name is not None:
            product["name"] = name
        if "description" in params:
            product["description"] = param_str(params, "description")
        if active is not None:
            product["active"] = active
        if metadata is not None:
            product["metadata"] = metadata
        previous = _changes(before, product)
        if previous:
            product["updated"] = self._now()
            self._emit("product.updated", product, previous)
        return copy.deepcopy(product)

    def list_products(self, params: JsonObject) -> JsonObject:
        active = _optional_bool(params, "active")
        found = [obj for obj in self._newest_first("product") if active is None or obj["active"] == active]
        return list_object(copy.deepcopy(found[: self._limit(params)]), "/v1/products")

    def create_price(self, params: JsonObject) -> JsonObject:
        currency = param_str(params, "currency", required=True)
        unit_amount = param_int(params, "unit_amount", required=True)
        assert currency is not None and unit_amount is not None
        if unit_amount < 0:
            raise StripeApiError(400, "unit_amount must be at least 0.", param="unit_amount")
        if unit_amount > MAX_AMOUNT:
            raise too_large("unit_amount")
        recurring = self._recurring_param(params)
        product_id = param_str(params, "product")
        product_data = param_dict(params, "product_data")
        if product_id is not None:
            self._get(product_id, "product", param="product")
        elif product_data:
            param_str(product_data, "name", required=True)
        else:
            raise StripeApiError(
                400, "Missing required param: product.", code="parameter_missing", param="product"
            )
        lookup_key = param_str(params, "lookup_key")
        holder = self._lookup_key_holder(lookup_key, transfer=param_bool(params, "transfer_lookup_key"))
        active = _optional_bool(params, "active")
        if product_id is None:
            product_id = self.create_product(product_data)["id"]
        price = self._store(
            {
                "id": new_id("price_"),
                "object": "price",
                "active": True if active is None else active,
                "billing_scheme": "per_unit",
                "created": self._now(),
                "currency": currency.lower(),
                "custom_unit_amount": None,
                "livemode": False,
                "lookup_key": lookup_key,
                "metadata": param_metadata(params),
                "nickname": param_str(params, "nickname"),
                "product": product_id,
                "recurring": recurring,
                "tax_behavior": "unspecified",
                "tiers_mode": None,
                "transform_quantity": None,
                "type": "one_time" if recurring is None else "recurring",
                "unit_amount": unit_amount,
                "unit_amount_decimal": str(unit_amount),
            }
        )
        if holder is not None:
            self._release_lookup_key(holder)
        self._emit("price.created", price)
        return copy.deepcopy(price)

    def _recurring_param(self, params: JsonObject) -> JsonObject | None:
        raw = param_dict(params, "recurring")
        if not raw:
            return None
        interval = param_str(raw, "interval", required=True)
        if interval not in INTERVALS:
            raise StripeApiError(
                400,
                f"Invalid recurring[interval]: must be one of day, week, month or year (got {interval}).",
                param="recurring[interval]",
            )
        count = param_int(raw, "interval_count") or 1
        if not 1 <= count <= MAX_INTERVAL_COUNT[interval]:
            raise StripeApiError(
                400,
                "The maximum billing period is three years: recurring[interval_count] must be between "
                f"1 and {MAX_INTERVAL_COUNT[interval]} for interval={interval}.",
                param="recurring[interval_count]",
            )
        if param_str(raw, "usage_type") not in (None, "licensed"):
            raise StripeApiError(
                400, "The simulator supports licensed prices only.", param="recurring[usage_type]"
            )
        return {
            "interval": interval,
            "interval_count": count,
            "meter": None,
            "trial_period_days": None,
            "usage_type": "licensed",
        }

    def _lookup_key_holder(self, lookup_key: str | None, *, transfer: bool) -> JsonObject | None:
        """The price that has ``lookup_key`` now (refused unless ``transfer``), if any."""
        if lookup_key is None:
            return None
        for obj in self._objects.values():
            if obj.get("object") == "price" and obj.get("lookup_key") == lookup_key:
                if not transfer:
                    raise StripeApiError(
                        400,
                        f"A price ({obj['id']}) already uses that lookup key. "
                        "Pass transfer_lookup_key=true to move it to this price.",
                        param="lookup_key",
                    )
                return obj
        return None

    def _release_lookup_key(self, holder: JsonObject) -> None:
        price = self._get(holder["id"], "price")
        price["lookup_key"] = None
        self._emit("price.updated", price, {"lookup_key": holder["lookup_key"]})

    def update_price(self, price_id: str, params: JsonObject) -> JsonObject:
        price = self._get(price_id, "price")
        active = _optional_bool(params, "active")
        metadata = updated_metadata(price["metadata"], params) if "metadata" in params else None
        lookup_key = param_str(params, "lookup_key")
        holder = None
        if lookup_key is not None and lookup_key != price["lookup_key"]:
            holder = self._lookup_key_holder(lookup_key, transfer=param_bool(params, "transfer_lookup_key"))
        before = copy.deepcopy(price)
        if holder is not None:
            self._release_lookup_key(holder)
        if "lookup_key" in params:
            price["lookup_key"] = lookup_key
        if active is not None:
            price["active"] = active
        if "nickname" in params:
            price["nickname"] = param_str(params, "nickname")
        if metadata is not None:
            price["metadata"] = metadata
        previous = _changes(before, price)
        if previous:
            self._emit("price.updated", price, previous)
        return copy.deepcopy(price)

    def list_prices(self, params: JsonObject) -> JsonObject:
        active = _optional_bool(params, "active")
        product = param_str(params, "product")
        price_type = param_str(params, "type")
        currency = param_str(params, "currency")
        lookup_keys = {str(key) for key in param_list(params, "lookup_keys")}
        interval = param_str(param_dict(params, "recurring"), "interval")
        found = [
            obj
            for obj in self._newest_first("price")
            if (active is None or obj["active"] == active)
            and product in (None, obj["product"])
            and price_type in (None, obj["type"])
            and (currency is None or obj["currency"] == currency.lower())
            and (not lookup_keys or obj["lookup_key"] in lookup_keys)
            and (interval is None or (obj["recurring"] or {}).get("interval") == interval)
        ]
        return list_object(copy.deepcopy(found[: self._limit(params)]), "/v1/prices")

    def _subscribable_price(self, price_id: str, param: str) -> JsonObject:
        price = self._get(price_id, "price", param=param)
        if not price["active"]:
            raise StripeApiError(
                400, "The price specified is inactive. This field only accepts active prices.", param=param
            )
        if price["recurring"] is None:
            raise StripeApiError(
                400,
                "The price specified is set to `type=one_time` but this field only accepts prices with "
                "`type=recurring`.",
                param=param,
            )
        return price

    @staticmethod
    def _same_cycle(prices: list[JsonObject], param: str) -> None:
        if len({(price["currency"], _cycle_of(price)) for price in prices}) > 1:
            raise StripeApiError(
                400,
                "Currency and interval fields must match across all plans on this subscription.",
                param=param,
            )

    # -- helpers --------------------------------------------------------------------------------

    def _newest_first(self, object_name: str) -> list[JsonObject]:
        self._check()
        return [
            obj
            for obj in reversed(self._objects.values())
            if obj.get("object") == object_name and not obj.get("deleted")
        ]

    @staticmethod
    def _limit(params: JsonObject) -> int:
        limit = param_int(params, "limit") or 10
        if not 1 <= limit <= 100:
            raise StripeApiError(400, "limit must be between 1 and 100.", param="limit")
        return limit

    def _product_name(self, price: JsonObject) -> str:
        product = self._objects.get(price["product"])
        return str(product["name"]) if product is not None and product.get("name") else "Subscription"

    def _usable_default(self, customer: JsonObject, payment_method_id: str | None, param: str) -> str | None:
        if payment_method_id is None:
            return None
        payment_method = self._get(payment_method_id, "payment_method", param=param)
        if payment_method["customer"] != customer["id"]:
            raise StripeApiError(
                400,
                f"The customer does not have a payment method with the ID {payment_method_id}. "
                "The payment method must be attached to the customer.",
                code="resource_missing",
                param=param,
            )
        return payment_method_id

    def _state(self, subscription_id: str) -> JsonObject:
        """A subscription's own record (reminders sent, pending prorations), to change."""
        self._touch(SUBSCRIPTION_STATE, subscription_id)
        state = self._subscription_states.get(subscription_id)
        if state is None:
            state = self._subscription_states[subscription_id] = {"reminded_for": None, "pending_lines": []}
        return state

    @staticmethod
    def _period(subscription: JsonObject) -> tuple[int, int]:
        item = subscription["items"]["data"][0]
        return int(item["current_period_start"]), int(item["current_period_end"])

    def _emit_subscription_update(self, subscription: JsonObject, before: JsonObject) -> None:
        previous = _changes(before, subscription)
        if previous:
            self._emit("customer.subscription.updated", subscription, previous)

    def _subscription_of(self, invoice: JsonObject) -> JsonObject | None:
        details = (invoice.get("parent") or {}).get("subscription_details")
        return self._get(details["subscription"], "subscription") if details else None

    def _invoices_of(self, subscription_id: str, statuses: frozenset[str]) -> list[JsonObject]:
        return [
            obj
            for obj in self._objects.values()
            if obj.get("object") == "invoice"
            and obj["status"] in statuses
            and ((obj.get("parent") or {}).get("subscription_details") or {}).get("subscription")
            == subscription_id
        ]

    # -- subscriptions --------------------------------------------------------------------------

    def _new_item(
        self, subscription_id: str, price: JsonObject, quantity: int, start: int, end: int
    ) -> JsonObject:
        return {
            "id": new_id("si_", 14),
            "object": "subscription_item",
            "billing_thresholds": None,
            "created": self._now(),
            "current_period_end": end,
            "current_period_start": start,
            "discounts": [],
            "metadata": {},
            "plan": _plan_of(price),
            "price": copy.deepcopy(price),
            "quantity": quantity,
            "subscription": subscription_id,
            "tax_rates": [],
        }

    def _items_param(self, params: JsonObject, param: str = "items") -> list[tuple[JsonObject, int]]:
        """A new subscription's ``items``: (price, quantity) each, checked."""
        raw_items = param_list(params, param)
        if not raw_items:
            raise StripeApiError(
                400, f"Missing required param: {param}.", code="parameter_missing", param=param
            )
        chosen: list[tuple[JsonObject, int]] = []
        for index, raw in enumerate(raw_items):
            where = f"{param}[{index}]"
            if not isinstance(raw, dict):
                raise StripeApiError(400, f"Invalid object: {where}", param=where)
            if "price_data" in raw:
                raise StripeApiError(
                    400,
                    "The simulator subscribes to existing prices only: pass price.",
                    param=f"{where}[price]",
                )
            price_id = param_str(raw, "price", required=True)
            assert price_id is not None
            price = self._subscribable_price(price_id, f"{where}[price]")
            chosen.append((price, self._quantity(raw, where, price)))
        self._same_cycle([price for price, _ in chosen], param)
        return chosen

    @staticmethod
    def _quantity(raw: JsonObject, where: str, price: JsonObject, default: int = 1) -> int:
        quantity = param_int(raw, "quantity")
        quantity = default if quantity is None else quantity
        if quantity < 1:
            raise StripeApiError(400, "Quantity must be at least 1.", param=f"{where}[quantity]")
        if price["unit_amount"] * quantity > MAX_AMOUNT:
            raise too_large(f"{where}[quantity]")
        return quantity

    def _start_subscription(
        self,
        customer: JsonObject,
        items: list[tuple[JsonObject, int]],
        *,
        metadata: dict[str, str],
        description: str | None,
        default_payment_method: str | None,
    ) -> tuple[JsonObject, JsonObject]:
        """A new subscription, ``incomplete``, and its first invoice, finalized (not charged)."""
        now = self._now()
        subscription_id = new_id("sub_")
        recurring = items[0][0]["recurring"]
        end = period_end_after(now, recurring, now)
        subscription = self._store(
            {
                "id": subscription_id,
                "object": "subscription",
                "application": None,
                "application_fee_percent": None,
                "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
                "billing_cycle_anchor": now,
                "billing_cycle_anchor_config": None,
                "billing_mode": {"flexible": None, "type": "classic", "updated_at": None},
                "billing_thresholds": None,
                "cancel_at": None,
                "cancel_at_period_end": False,
                "canceled_at": None,
                "cancellation_details": {"comment": None, "feedback": None, "reason": None},
                "collection_method": "charge_automatically",
                "created": now,
                "currency": items[0][0]["currency"],
                "customer": customer["id"],
                "days_until_due": None,
                "default_payment_method": default_payment_method,
                "default_source": None,
                "default_tax_rates": [],
                "description": description,
                "discounts": [],
                "ended_at": None,
                "invoice_settings": {"account_tax_ids": None, "issuer": {"account": None, "type": "self"}},
                "items": {
                    "object": "list",
                    "data": [
                        self._new_item(subscription_id, price, quantity, now, end)
                        for price, quantity in items
                    ],
                    "has_more": False,
                    "total_count": len(items),
                    "url": f"/v1/subscription_items?subscription={subscription_id}",
                },
                "latest_invoice": None,
                "livemode": False,
                "metadata": metadata,
                "next_pending_invoice_item_invoice": None,
                "on_behalf_of": None,
                "pause_collection": None,
                "payment_settings": {
                    "payment_method_options": None,
                    "payment_method_types": None,
                    "save_default_payment_method": "off",
                },
                "pending_invoice_item_interval": None,
                "pending_setup_intent": None,
                "pending_update": None,
                "schedule": None,
                "start_date": now,
                "status": "incomplete",
                "test_clock": customer.get("test_clock"),
                "transfer_data": None,
                "trial_end": None,
                "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
                "trial_start": None,
            }
        )
        self._state(subscription_id)
        self._emit("customer.subscription.created", subscription)
        invoice = self._new_invoice(
            subscription, "subscription_create", now, now, self._item_lines(subscription, now, end)
        )
        subscription["latest_invoice"] = invoice["id"]
        self._finalize(invoice, collect=False)
        return subscription, invoice

    def create_subscription(self, params: JsonObject) -> JsonObject:
        customer_id = param_str(params, "customer", required=True)
        assert customer_id is not None
        customer = self._get(customer_id, "customer", param="customer")
        items = self._items_param(params)
        default_payment_method = self._usable_default(
            customer, param_str(params, "default_payment_method"), "default_payment_method"
        )
        behavior = param_str(params, "payment_behavior") or "allow_incomplete"
        if behavior not in PAYMENT_BEHAVIORS:
            raise StripeApiError(
                400,
                "payment_behavior must be one of allow_incomplete, default_incomplete or error_if_incomplete "
                "on creation.",
                param="payment_behavior",
            )
        if param_str(params, "collection_method") not in (None, "charge_automatically"):
            raise StripeApiError(
                400,
                "The simulator bills subscriptions with charge_automatically only.",
                param="collection_method",
            )
        for trial in ("trial_period_days", "trial_end", "trial_from_plan"):
            if params.get(trial) not in (None, ""):
                raise StripeApiError(400, "The simulator does not model trials.", param=trial)
        off_session = param_bool(params, "off_session")
        cancel_at_period_end = param_bool(params, "cancel_at_period_end")
        metadata, description = param_metadata(params), param_str(params, "description")
        payment_method = default_payment_method or customer["invoice_settings"]["default_payment_method"]
        if behavior == "error_if_incomplete":
            self._precheck(
                payment_method, [price["unit_amount"] * quantity for price, quantity in items], off_session
            )
        with self._at(self._time_of(customer.get("test_clock"))):
            subscription, invoice = self._start_subscription(
                customer,
                items,
                metadata=metadata,
                description=description,
                default_payment_method=default_payment_method,
            )
            if cancel_at_period_end:
                subscription.update(
                    cancel_at_period_end=True,
                    cancel_at=self._period(subscription)[1],
                    canceled_at=subscription["created"],
                )
            if (
                behavior != "default_incomplete"
                and invoice["status"] == "open"
                and payment_method is not None
            ):
                self._collect(invoice, automatic=False, off_session=off_session)
        return copy.deepcopy(subscription)

    def _precheck(self, payment_method_id: str | None, amounts: list[int], off_session: bool) -> None:
        """``error_if_incomplete``: refuse (402, nothing made) a change whose charge would fail."""
        if sum(amounts) <= 0:
            return
        if payment_method_id is None:
            raise StripeApiError(400, NO_PAYMENT_METHOD.message, code="resource_missing")
        card = self._cards.get(payment_method_id)
        decline = card.charge_decline(off_session=off_session) if card is not None else None
        if decline is not None:
            raise self._decline_error(decline)

    def list_subscriptions(self, params: JsonObject) -> JsonObject:
        customer = param_str(params, "customer")
        status = param_str(params, "status")
        if status is not None and status != "all" and status not in SUBSCRIPTION_STATUSES:
            raise StripeApiError(400, f"Invalid status: {status}", param="status")
        price = param_str(params, "price")
        clock = param_str(params, "test_clock")
        found = [
            obj
            for obj in self._newest_first("subscription")
            if customer in (None, obj["customer"])
            and clock in (None, obj["test_clock"])
            and (
                status == "all" or obj["status"] == status or (status is None and obj["status"] not in ENDED)
            )
            and (price is None or any(item["price"]["id"] == price for item in obj["items"]["data"]))
        ]
        return list_object(copy.deepcopy(found[: self._limit(params)]), "/v1/subscriptions")

    def update_subscription(self, subscription_id: str, params: JsonObject) -> JsonObject:
        subscription = self._get(subscription_id, "subscription")
        customer = self._get(subscription["customer"], "customer")
        ended = subscription["status"] in ENDED
        if ended and any(name not in ("metadata", "cancellation_details") for name in params):
            raise StripeApiError(
                400, "A canceled subscription can only update its cancellation_details and metadata."
            )
        now = self._time_of(subscription["test_clock"])
        metadata = updated_metadata(subscription["metadata"], params) if "metadata" in params else None
        details = self._cancellation_details(params)
        cancel_at_period_end = _optional_bool(params, "cancel_at_period_end")
        pause = self._pause_param(params, now)
        default_payment_method = (
            self._usable_default(
                customer, param_str(params, "default_payment_method"), "default_payment_method"
            )
            if "default_payment_method" in params
            else subscription["default_payment_method"]
        )
        change = self._item_change(subscription, params, now) if "items" in params else None
        behavior = param_str(params, "payment_behavior") or "allow_incomplete"
        if behavior not in PAYMENT_BEHAVIORS:
            message = (
                "The simulator does not model pending updates (pending_if_incomplete)."
                if behavior == "pending_if_incomplete"
                else f"Invalid payment_behavior: {behavior}"
            )
            raise StripeApiError(400, message, param="payment_behavior")
        off_session = param_bool(params, "off_session")
        bill_now = change is not None and change.bill_now
        payment_method = default_payment_method or customer["invoice_settings"]["default_payment_method"]
        if bill_now and behavior == "error_if_incomplete":
            assert change is not None
            pending = self._subscription_states.get(subscription_id, {}).get("pending_lines", [])
            self._precheck(
                payment_method, [line["amount"] for line in [*pending, *change.lines]], off_session
            )

        with self._at(now):
            before = copy.deepcopy(subscription)
            if metadata is not None:
                subscription["metadata"] = metadata
            if "description" in params:
                subscription["description"] = param_str(params, "description")
            subscription["default_payment_method"] = default_payment_method
            if (
                cancel_at_period_end is not None
                and cancel_at_period_end != subscription["cancel_at_period_end"]
            ):
                subscription.update(
                    cancel_at_period_end=cancel_at_period_end,
                    cancel_at=self._period(subscription)[1] if cancel_at_period_end else None,
                    canceled_at=now if cancel_at_period_end else None,
                )
                if not cancel_at_period_end:  # no longer canceling: no reasons either
                    subscription["cancellation_details"] = {"comment": None, "feedback": None, "reason": None}
            if details is not None:
                subscription["cancellation_details"] = {**subscription["cancellation_details"], **details}
            if "pause_collection" in params:
                subscription["pause_collection"] = pause
            invoice = None
            if change is not None:
                state = self._state(subscription_id)
                bill, state["pending_lines"] = self._apply_item_change(
                    subscription, change, state["pending_lines"]
                )
                if bill is not None:
                    invoice = self._new_invoice(
                        subscription, "subscription_update", change.at, change.at, bill, announce=False
                    )
                if subscription["cancel_at_period_end"]:
                    subscription["cancel_at"] = self._period(subscription)[1]
            if invoice is not None:
                subscription["latest_invoice"] = invoice["id"]
            self._emit_subscription_update(subscription, before)
            if invoice is not None:
                self._emit("invoice.created", invoice)
                self._finalize(invoice, collect=False)
                if invoice["status"] == "open" and behavior != "default_incomplete":
                    self._collect(invoice, automatic=True, off_session=off_session)
        return copy.deepcopy(subscription)

    @staticmethod
    def _cancellation_details(params: JsonObject) -> JsonObject | None:
        if "cancellation_details" not in params:
            return None
        raw = param_dict(params, "cancellation_details")
        feedback = param_str(raw, "feedback")
        if feedback is not None and feedback not in CANCELLATION_FEEDBACK:
            raise StripeApiError(400, f"Invalid feedback: {feedback}", param="cancellation_details[feedback]")
        return {"comment": param_str(raw, "comment"), "feedback": feedback}

    @staticmethod
    def _pause_param(params: JsonObject, now: int) -> JsonObject | None:
        if params.get("pause_collection") in (None, ""):
            return None
        raw = param_dict(params, "pause_collection")
        behavior = param_str(raw, "behavior", required=True)
        if behavior not in PAUSE_BEHAVIORS:
            raise StripeApiError(
                400,
                "pause_collection[behavior] must be one of keep_as_draft, mark_uncollectible or void.",
                param="pause_collection[behavior]",
            )
        resumes_at = param_int(raw, "resumes_at")
        if resumes_at is not None and resumes_at <= now:
            raise StripeApiError(
                400,
                "pause_collection[resumes_at] must be in the future.",
                param="pause_collection[resumes_at]",
            )
        return {"behavior": behavior, "resumes_at": resumes_at}

    def cancel_subscription(self, subscription_id: str, params: JsonObject) -> JsonObject:
        subscription = self._get(subscription_id, "subscription")
        if subscription["status"] in ENDED:
            raise StripeApiError(
                400, f"The subscription {subscription_id} has already been canceled.", param="id"
            )
        details = self._cancellation_details(params)
        prorate = param_bool(params, "prorate")
        invoice_now = param_bool(params, "invoice_now")
        with self._at(self._time_of(subscription["test_clock"])):
            now = self._now()
            state = self._state(subscription_id)
            if prorate and subscription["status"] != "incomplete":
                end = self._period(subscription)[1]
                state["pending_lines"] += [
                    self._proration_line(
                        subscription, item, item["price"], item["quantity"], now, end, credit=True
                    )
                    for item in subscription["items"]["data"]
                ]
            if details is not None:
                subscription["cancellation_details"] = {**subscription["cancellation_details"], **details}
            subscription["canceled_at"] = now  # this request (not an earlier cancel_at_period_end)
            self._end_subscription(subscription, reason="cancellation_requested")
            if invoice_now and state["pending_lines"]:
                invoice = self._new_invoice(
                    subscription, "subscription_update", now, now, state["pending_lines"]
                )
                state["pending_lines"] = []
                self._finalize(invoice, collect=True)
        return copy.deepcopy(subscription)

    def _end_subscription(self, subscription: JsonObject, *, reason: str) -> None:
        """Canceled now: its open invoices are no longer retried, its drafts not finalized."""
        now = self._now()
        subscription.update(status="canceled", ended_at=now, canceled_at=subscription["canceled_at"] or now)
        subscription["cancellation_details"] = {**subscription["cancellation_details"], "reason": reason}
        for found in self._invoices_of(subscription["id"], frozenset({"draft", "open"})):
            invoice = self._get(found["id"], "invoice")
            invoice.update(auto_advance=False, next_payment_attempt=None, automatically_finalizes_at=None)
        self._emit("customer.subscription.deleted", subscription)

    def replace_default_card(self, customer_id: str, card_number: str) -> JsonObject:
        """A test control, as a customer changing their card in Stripe's billing portal: the card
        saved and made the default of the customer and of each of its subscriptions that has one."""
        payment_method = self.add_test_card(customer_id, card_number)
        self.update_customer(
            customer_id, {"invoice_settings": {"default_payment_method": payment_method["id"]}}
        )
        for obj in list(self._objects.values()):
            if (
                obj.get("object") == "subscription"
                and obj["customer"] == customer_id
                and obj["status"] not in ENDED
                and obj["default_payment_method"] is not None
            ):
                subscription = self._get(obj["id"], "subscription")
                before = copy.deepcopy(subscription)
                subscription["default_payment_method"] = payment_method["id"]
                self._emit_subscription_update(subscription, before)
        return payment_method

    # -- item changes and prorations ------------------------------------------------------------

    def _item_change(self, subscription: JsonObject, params: JsonObject, now: int) -> _ItemChange:
        """What ``items`` (with ``proration_behavior``, ``proration_date``) would do, checked;
        nothing changed yet."""
        if subscription["status"] == "incomplete":
            raise StripeApiError(
                400, "An incomplete subscription's items cannot be changed before its first invoice is paid."
            )
        behavior = param_str(params, "proration_behavior") or "create_prorations"
        if behavior not in PRORATION_BEHAVIORS:
            raise StripeApiError(
                400,
                "proration_behavior must be one of always_invoice, create_prorations or none.",
                param="proration_behavior",
            )
        start, end = self._period(subscription)
        at = param_int(params, "proration_date")
        at = now if at is None else at
        if not start <= at <= end:
            raise StripeApiError(
                400, "proration_date must be within the current billing period.", param="proration_date"
            )
        current = {item["id"]: item for item in subscription["items"]["data"]}
        kept: dict[str, tuple[JsonObject, int]] = {}
        removed: set[str] = set()
        added: list[tuple[JsonObject, int]] = []
        for index, raw in enumerate(param_list(params, "items")):
            where = f"items[{index}]"
            if not isinstance(raw, dict):
                raise StripeApiError(400, f"Invalid object: {where}", param=where)
            item_id = param_str(raw, "id")
            price_id = param_str(raw, "price")
            if item_id is None:
                if price_id is None:
                    raise StripeApiError(
                        400, f"Missing required param: {where}[price].", code="parameter_missing", param=where
                    )
                price = self._subscribable_price(price_id, f"{where}[price]")
                added.append((price, self._quantity(raw, where, price)))
                continue
            item = current.get(item_id)
            if item is None:
                raise StripeApiError(
                    400,
                    f"No such subscription item: '{item_id}'",
                    code="resource_missing",
                    param=f"{where}[id]",
                )
            if param_bool(raw, "deleted"):
                removed.add(item_id)
                continue
            price = (
                self._subscribable_price(price_id, f"{where}[price]")
                if price_id is not None and price_id != item["price"]["id"]
                else item["price"]
            )
            kept[item_id] = (price, self._quantity(raw, where, price, default=item["quantity"]))
        remaining = [item for item in subscription["items"]["data"] if item["id"] not in removed]
        prices = [kept.get(item["id"], (item["price"], 0))[0] for item in remaining] + [p for p, _ in added]
        if not prices:
            raise StripeApiError(400, "A subscription must keep at least one item.", param="items")
        if any(price["currency"] != subscription["currency"] for price in prices):
            raise StripeApiError(
                400, "The prices of a subscription must all be in its currency.", param="items"
            )
        self._same_cycle(prices, "items")
        cycle_changed = _cycle_of(prices[0]) != _cycle_of(subscription["items"]["data"][0]["price"])
        change = _ItemChange(
            at=at,
            behavior=behavior,
            recurring=prices[0]["recurring"],
            cycle_changed=cycle_changed,
            removed=removed,
            kept=kept,
            added=added,
        )
        change.lines = self._change_lines(subscription, change, end)
        return change

    def _change_lines(self, subscription: JsonObject, change: _ItemChange, end: int) -> list[JsonObject]:
        """The prorations a change makes: credit for the unused time of what is removed or
        changed, charge for the rest of the period of what replaces it (when the interval
        changes, the credit only: the new period is billed in full, ``_apply_item_change``)."""
        at, lines = change.at, []
        prorate = change.behavior != "none"
        for item in subscription["items"]["data"]:
            price, quantity = change.kept.get(item["id"], (item["price"], item["quantity"]))
            same = price["id"] == item["price"]["id"] and quantity == item["quantity"]
            if item["id"] in change.removed or change.cycle_changed or not same:
                if prorate:
                    lines.append(
                        self._proration_line(
                            subscription, item, item["price"], item["quantity"], at, end, credit=True
                        )
                    )
                if item["id"] not in change.removed and not change.cycle_changed and prorate:
                    lines.append(
                        self._proration_line(subscription, item, price, quantity, at, end, credit=False)
                    )
        if not change.cycle_changed and prorate:
            for price, quantity in change.added:
                lines.append(self._proration_line(subscription, None, price, quantity, at, end, credit=False))
        return lines

    def _apply_item_change(
        self, subscription: JsonObject, change: _ItemChange, pending: list[JsonObject]
    ) -> tuple[list[JsonObject] | None, list[JsonObject]]:
        """The change made to the items; (the lines to bill now, or ``None`` when the
        prorations wait for the renewal; the prorations pending after)."""
        start, end = self._period(subscription)
        if change.cycle_changed:
            start, end = change.at, period_end_after(change.at, change.recurring, change.at)
            subscription["billing_cycle_anchor"] = change.at
        items: list[JsonObject] = []
        for item in subscription["items"]["data"]:
            if item["id"] in change.removed:
                continue
            price, quantity = change.kept.get(item["id"], (item["price"], item["quantity"]))
            item.update(
                price=copy.deepcopy(price),
                plan=_plan_of(price),
                quantity=quantity,
                current_period_start=start,
                current_period_end=end,
            )
            items.append(item)
        for price, quantity in change.added:
            item = self._new_item(subscription["id"], price, quantity, start, end)
            items.append(item)
            for line in change.lines:  # the new item's proration names it
                details = line["parent"]["subscription_item_details"]
                if (
                    details["subscription_item"] is None
                    and line["pricing"]["price_details"]["price"] == price["id"]
                ):
                    details["subscription_item"] = item["id"]
        subscription["items"] = {**subscription["items"], "data": items, "total_count": len(items)}
        if change.cycle_changed:
            return [*pending, *change.lines, *self._item_lines(subscription, start, end)], []
        if change.behavior == "always_invoice" and change.lines:
            return [*pending, *change.lines], []
        return None, [*pending, *change.lines]

    def _proration_line(
        self,
        subscription: JsonObject,
        item: JsonObject | None,
        price: JsonObject,
        quantity: int,
        at: int,
        end: int,
        *,
        credit: bool,
    ) -> JsonObject:
        start = self._period(subscription)[0]
        amount = prorated(price["unit_amount"] * quantity, end - at, end - start)
        name = self._product_name(price)
        which = "Unused" if credit else "Remaining"
        return {
            "id": new_id("il_"),
            "object": "line_item",
            "amount": -amount if credit else amount,
            "currency": price["currency"],
            "description": f"{which} time on {quantity}{TIMES}{name} after {_day(at)}",
            "discount_amounts": [],
            "discountable": False,
            "discounts": [],
            "invoice": None,
            "livemode": False,
            "metadata": {},
            "parent": {
                "invoice_item_details": None,
                "subscription_item_details": {
                    "invoice_item": new_id("ii_"),
                    "proration": True,
                    "proration_details": {"credited_items": None},
                    "subscription": subscription["id"],
                    "subscription_item": item["id"] if item is not None else None,
                },
                "type": "subscription_item_details",
            },
            "period": {"end": end, "start": at},
            "pretax_credit_amounts": [],
            "pricing": {
                "price_details": {"price": price["id"], "product": price["product"]},
                "type": "price_details",
                "unit_amount_decimal": price["unit_amount_decimal"],
            },
            "quantity": quantity,
            "subtotal": -amount if credit else amount,
            "taxes": [],
        }

    def _item_lines(self, subscription: JsonObject, start: int, end: int) -> list[JsonObject]:
        """A line per item for the period ``[start, end)``, in full."""
        lines = []
        for item in subscription["items"]["data"]:
            price, quantity = item["price"], item["quantity"]
            amount = price["unit_amount"] * quantity
            lines.append(
                {
                    "id": new_id("il_"),
                    "object": "line_item",
                    "amount": amount,
                    "currency": price["currency"],
                    "description": f"{quantity}{TIMES}{self._product_name(price)} (at "
                    f"{format_amount(price['unit_amount'], price['currency'])} / "
                    f"{_interval_text(price['recurring'])})",
                    "discount_amounts": [],
                    "discountable": True,
                    "discounts": [],
                    "invoice": None,
                    "livemode": False,
                    "metadata": dict(subscription["metadata"]),
                    "parent": {
                        "invoice_item_details": None,
                        "subscription_item_details": {
                            "invoice_item": None,
                            "proration": False,
                            "proration_details": {"credited_items": None},
                            "subscription": subscription["id"],
                            "subscription_item": item["id"],
                        },
                        "type": "subscription_item_details",
                    },
                    "period": {"end": end, "start": start},
                    "pretax_credit_amounts": [],
                    "pricing": {
                        "price_details": {"price": price["id"], "product": price["product"]},
                        "type": "price_details",
                        "unit_amount_decimal": price["unit_amount_decimal"],
                    },
                    "quantity": quantity,
                    "subtotal": amount,
                    "taxes": [],
                }
            )
        return lines

    # -- what falls due -------------------------------------------------------------------------

    def _remind(self, subscription_id: str) -> None:
        subscription = self._get(subscription_id, "subscription")
        state = self._state(subscription_id)
        state["reminded_for"] = self._period(subscription)[1]
        preview = self._renewal_preview(subscription, state["pending_lines"])
        del preview["id"]  # Stripe's upcoming invoice has no id
        self._emit("invoice.upcoming", preview)

    def _renew(self, subscription_id: str) -> None:
        """The period has ended: the subscription ends (``cancel_at_period_end``) or starts the
        next period with its invoice, a draft finalized an hour later (or, collection paused,
        voided, marked uncollectible or kept as a draft)."""
        subscription = self._get(subscription_id, "subscription")
        if subscription["cancel_at_period_end"]:
            self._end_subscription(subscription, reason="cancellation_requested")
            return
        before = copy.deepcopy(subscription)
        state = self._state(subscription_id)
        start, end = self._period(subscription)
        following = period_end_after(
            subscription["billing_cycle_anchor"], subscription["items"]["data"][0]["price"]["recurring"], end
        )
        for item in subscription["items"]["data"]:
            item.update(current_period_start=end, current_period_end=following)
        lines = [*state["pending_lines"], *self._item_lines(subscription, end, following)]
        state["pending_lines"] = []
        invoice = self._new_invoice(subscription, "subscription_cycle", start, end, lines, announce=False)
        subscription["latest_invoice"] = invoice["id"]
        self._emit_subscription_update(subscription, before)
        self._emit("invoice.created", invoice)
        pause = subscription["pause_collection"]
        if pause is None:
            invoice["automatically_finalizes_at"] = end + FINALIZE_AFTER_SECONDS
        elif pause["behavior"] == "keep_as_draft":
            invoice["auto_advance"] = False
        else:
            self._finalize(invoice, collect=False)
            if invoice["status"] == "open":
                if pause["behavior"] == "void":
                    self._close(invoice, "void")
                else:
                    self._close(invoice, "uncollectible")

    def _finalize_due(self, invoice_id: str) -> None:
        self._finalize(self._get(invoice_id, "invoice"), collect=True)

    def _retry_due(self, invoice_id: str) -> None:
        self._collect(self._get(invoice_id, "invoice"), automatic=True)

    def _resume_collection(self, subscription_id: str) -> None:
        subscription = self._get(subscription_id, "subscription")
        before = copy.deepcopy(subscription)
        subscription["pause_collection"] = None
        self._emit_subscription_update(subscription, before)

    def _expire_incomplete(self, subscription_id: str) -> None:
        subscription = self._get(subscription_id, "subscription")
        subscription.update(status="incomplete_expired", ended_at=self._now())
        for found in self._invoices_of(subscription_id, frozenset({"open"})):
            self._close(self._get(found["id"], "invoice"), "void")
        self._emit("customer.subscription.deleted", subscription)

    # -- invoices -------------------------------------------------------------------------------

    def _new_invoice(
        self,
        subscription: JsonObject,
        billing_reason: str,
        period_start: int,
        period_end: int,
        lines: list[JsonObject],
        *,
        announce: bool = True,
    ) -> JsonObject:
        """A draft invoice of ``lines`` (``invoice.created`` unless ``announce`` is false)."""
        invoice = self._invoice_object(
            new_id("in_"), subscription, billing_reason, period_start, period_end, lines, auto_advance=True
        )
        self._store(invoice)
        if announce:
            self._emit("invoice.created", invoice)
        return invoice

    def _invoice_object(
        self,
        invoice_id: str,
        subscription: JsonObject,
        billing_reason: str,
        period_start: int,
        period_end: int,
        lines: list[JsonObject],
        *,
        auto_advance: bool,
    ) -> JsonObject:
        customer = self._objects[subscription["customer"]]
        lines = copy.deepcopy(lines)
        for line in lines:
            line["invoice"] = invoice_id
        total = sum(int(line["amount"]) for line in lines)
        due = max(0, total)
        return {
            "id": invoice_id,
            "object": "invoice",
            "account_country": "US",
            "account_name": None,
            "account_tax_ids": None,
            "amount_due": due,
            "amount_overpaid": 0,
            "amount_paid": 0,
            "amount_paid_off_stripe": 0,
            "amount_remaining": due,
            "amount_shipping": 0,
            "application": None,
            "attempt_count": 0,
            "attempted": False,
            "auto_advance": auto_advance,
            "automatic_tax": {
                "disabled_reason": None,
                "enabled": False,
                "liability": None,
                "provider": None,
                "status": None,
            },
            "automatically_finalizes_at": None,
            "billing_reason": billing_reason,
            "collection_method": "charge_automatically",
            "confirmation_secret": None,
            "created": self._now(),
            "currency": subscription["currency"],
            "custom_fields": None,
            "customer": customer["id"],
            "customer_address": None,
            "customer_email": customer.get("email"),
            "customer_name": customer.get("name"),
            "customer_phone": customer.get("phone"),
            "customer_shipping": None,
            "customer_tax_exempt": "none",
            "customer_tax_ids": [],
            "default_payment_method": None,
            "default_source": None,
            "default_tax_rates": [],
            "description": None,
            "discounts": [],
            "due_date": None,
            "effective_at": None,
            "ending_balance": None,
            "footer": None,
            "from_invoice": None,
            "hosted_invoice_url": None,
            "invoice_pdf": None,
            "issuer": {"account": None, "type": "self"},
            "last_finalization_error": None,
            "latest_revision": None,
            "lines": {
                "object": "list",
                "data": lines,
                "has_more": False,
                "total_count": len(lines),
                "url": f"/v1/invoices/{invoice_id}/lines",
            },
            "livemode": False,
            "metadata": {},
            "next_payment_attempt": None,
            "number": None,
            "on_behalf_of": None,
            "parent": {
                "quote_details": None,
                "subscription_details": {
                    "metadata": dict(subscription["metadata"]),
                    "subscription": subscription["id"],
                    "subscription_proration_date": None,
                },
                "type": "subscription_details",
            },
            "payment_settings": {
                "default_mandate": None,
                "payment_method_options": None,
                "payment_method_types": None,
            },
            "period_end": period_end,
            "period_start": period_start,
            "post_payment_credit_notes_amount": 0,
            "pre_payment_credit_notes_amount": 0,
            "receipt_number": None,
            "rendering": None,
            "shipping_cost": None,
            "shipping_details": None,
            "starting_balance": 0,
            "statement_descriptor": None,
            "status": "draft",
            "status_transitions": {
                "finalized_at": None,
                "marked_uncollectible_at": None,
                "paid_at": None,
                "voided_at": None,
            },
            "subtotal": total,
            "subtotal_excluding_tax": total,
            "test_clock": subscription["test_clock"],
            "total": total,
            "total_discount_amounts": [],
            "total_excluding_tax": total,
            "total_pretax_credit_amounts": [],
            "total_taxes": [],
            "webhooks_delivered_at": None,
        }

    def _renewal_preview(self, subscription: JsonObject, pending: list[JsonObject]) -> JsonObject:
        """The invoice the next renewal would make (not stored)."""
        start, end = self._period(subscription)
        recurring = subscription["items"]["data"][0]["price"]["recurring"]
        following = period_end_after(subscription["billing_cycle_anchor"], recurring, end)
        lines = [*pending, *self._item_lines(subscription, end, following)]
        preview = self._invoice_object(
            new_id("upcoming_in_"), subscription, "upcoming", start, end, lines, auto_advance=True
        )
        preview.update(created=end, next_payment_attempt=end + FINALIZE_AFTER_SECONDS)  # when it is charged
        return self._with_balance(preview)

    def _with_balance(self, invoice: JsonObject) -> JsonObject:
        """The amounts once the customer's balance (credit, or debt) is applied."""
        balance = int(self._objects[invoice["customer"]].get("balance") or 0)
        combined = invoice["total"] + balance
        invoice.update(
            starting_balance=balance,
            ending_balance=min(0, combined),
            amount_due=max(0, combined),
            amount_remaining=max(0, combined),
        )
        return invoice

    def _finalize(self, invoice: JsonObject, *, collect: bool) -> None:
        """Draft to open: numbered, the customer's balance applied, the hosted page opened; an
        invoice with nothing to pay is paid at once, another charged when ``collect``."""
        now = self._now()
        customer = self._get(invoice["customer"], "customer")
        number = 1 + sum(
            1
            for obj in self._objects.values()
            if obj.get("object") == "invoice" and obj.get("customer") == customer["id"] and obj["number"]
        )
        self._with_balance(invoice)
        if invoice["ending_balance"] != customer["balance"]:
            previous = {"balance": customer["balance"]}
            customer["balance"] = invoice["ending_balance"]
            self._emit("customer.updated", customer, previous)
        invoice.update(
            status="open",
            number=f"{customer['invoice_prefix']}-{number:04d}",
            hosted_invoice_url=f"{self.public_base_url}/invoices/{invoice['id']}",
            effective_at=now,
            automatically_finalizes_at=None,
        )
        invoice["status_transitions"]["finalized_at"] = now
        self._emit("invoice.finalized", invoice)
        if invoice["amount_due"] == 0:
            self._mark_paid(invoice)
        elif collect:
            self._collect(invoice, automatic=True)

    def _payment_method_for(self, invoice: JsonObject) -> str | None:
        """The invoice's, else its subscription's, else its customer's default payment method."""
        if invoice["default_payment_method"]:
            return str(invoice["default_payment_method"])
        subscription = self._subscription_of(invoice)
        if subscription is not None and subscription["default_payment_method"]:
            return str(subscription["default_payment_method"])
        customer = self._objects[invoice["customer"]]
        method = customer["invoice_settings"]["default_payment_method"]
        return str(method) if method else None

    def _invoice_intent(self, invoice: JsonObject) -> JsonObject:
        """The invoice's PaymentIntent (made at the first attempt, charged again at each)."""
        payments = self._invoice_payments.get(invoice["id"])
        if payments:
            intent = self._get(payments[-1]["payment"]["payment_intent"], "payment_intent")
            intent["amount"] = invoice["amount_remaining"]
            return intent
        intent = self._new_payment_intent(
            amount=invoice["amount_remaining"],
            currency=invoice["currency"],
            customer=invoice["customer"],
            metadata={},
            description=_PAYMENT_DESCRIPTIONS.get(invoice["billing_reason"]),
            payment_method_types=["card"],
        )
        now = self._now()
        self._put(
            INVOICE_PAYMENTS,
            invoice["id"],
            [
                {
                    "id": new_id("inpay_"),
                    "object": "invoice_payment",
                    "amount_paid": None,
                    "amount_requested": invoice["amount_remaining"],
                    "created": now,
                    "currency": invoice["currency"],
                    "invoice": invoice["id"],
                    "is_default": True,
                    "livemode": False,
                    "payment": {"payment_intent": intent["id"], "type": "payment_intent"},
                    "status": "open",
                    "status_transitions": {"canceled_at": None, "paid_at": None},
                }
            ],
        )
        return intent

    def invoice_payments(self, invoice_id: str) -> JsonObject:
        """An invoice's ``payments`` (includable with ``expand[]=payments``)."""
        return list_object(
            copy.deepcopy(self._invoice_payments.get(invoice_id, [])), f"/v1/invoices/{invoice_id}/payments"
        )

    def _collect(
        self,
        invoice: JsonObject,
        *,
        automatic: bool,
        payment_method_id: str | None = None,
        off_session: bool = True,
    ) -> Decline | None:
        """One attempt to charge an open invoice; how it failed (``None``: paid). An automatic
        attempt's failure schedules the next retry (or, out of retries, gives up)."""
        method_id = payment_method_id or self._payment_method_for(invoice)
        invoice["attempt_count"] += 1
        invoice["attempted"] = True
        decline: Decline | None = NO_PAYMENT_METHOD
        if method_id is not None:
            payment_method = self._get(method_id, "payment_method")
            intent = self._invoice_intent(invoice)
            card = self._cards.get(method_id)
            decline = card.charge_decline(off_session=off_session) if card is not None else None
            self._charge(intent, payment_method, decline)
        if decline is None:
            self._mark_paid(invoice)
        else:
            self._payment_failed(invoice, automatic=automatic)
        return decline

    def _mark_paid(self, invoice: JsonObject, *, out_of_band: bool = False) -> None:
        now = self._now()
        invoice.update(
            status="paid",
            amount_paid=invoice["amount_due"],
            amount_paid_off_stripe=invoice["amount_due"] if out_of_band else 0,
            amount_remaining=0,
            next_payment_attempt=None,
            auto_advance=False,
        )
        invoice["status_transitions"]["paid_at"] = now
        payments = self._invoice_payments.get(invoice["id"])
        if payments and not out_of_band:
            self._touch(INVOICE_PAYMENTS, invoice["id"])
            payment = payments[-1]
            payment.update(status="paid", amount_paid=invoice["amount_paid"])
            payment["status_transitions"]["paid_at"] = now
            self._emit("invoice_payment.paid", payment)
        self._emit("invoice.paid", invoice)
        if not out_of_band:
            self._emit("invoice.payment_succeeded", invoice)
        subscription = self._subscription_of(invoice)
        if subscription is not None:
            self._settle(subscription, paid=True)

    def _payment_failed(self, invoice: JsonObject, *, automatic: bool) -> None:
        first = invoice["billing_reason"] == "subscription_create"
        if automatic and not first:
            index = invoice["attempt_count"] - 1
            retries = self.payment_retry_days
            invoice["next_payment_attempt"] = (
                self._now() + retries[index] * DAY if index < len(retries) else None
            )
        self._emit("invoice.payment_failed", invoice)
        subscription = self._subscription_of(invoice)
        if subscription is None or subscription["status"] in ENDED:
            return
        if subscription["status"] in ("active", "trialing"):
            before = copy.deepcopy(subscription)
            subscription["status"] = "past_due"
            self._emit_subscription_update(subscription, before)
        if automatic and not first and invoice["next_payment_attempt"] is None:
            # Out of retries: Stripe's default, the subscription canceled, the invoice uncollectible.
            self._end_subscription(subscription, reason="payment_failed")
            self._close(invoice, "uncollectible")

    def _settle(self, subscription: JsonObject, *, paid: bool) -> None:
        """``active`` again once no invoice of a past due subscription is open (an incomplete
        one: once its first invoice is paid)."""
        if subscription["status"] not in ("incomplete", "past_due", "unpaid"):
            return
        if subscription["status"] == "incomplete" and not paid:
            return
        if self._invoices_of(subscription["id"], frozenset({"open"})):
            return
        before = copy.deepcopy(subscription)
        subscription["status"] = "active"
        self._emit_subscription_update(subscription, before)

    def _close(self, invoice: JsonObject, status: str) -> None:
        """An open invoice voided or marked uncollectible: never retried again."""
        now = self._now()
        previous = {"status": invoice["status"]}
        invoice.update(status=status, next_payment_attempt=None, auto_advance=False)
        if status == "void":
            invoice["status_transitions"]["voided_at"] = now
            invoice["amount_remaining"] = 0
            self._emit("invoice.voided", invoice, previous)
        else:
            invoice["status_transitions"]["marked_uncollectible_at"] = now
            self._emit("invoice.marked_uncollectible", invoice, previous)
        subscription = self._subscription_of(invoice)
        if subscription is not None:
            self._settle(subscription, paid=False)

    def _open_invoice(self, invoice_id: str, *, also: frozenset[str] = frozenset()) -> JsonObject:
        invoice = self._get(invoice_id, "invoice")
        if invoice["status"] != "open" and invoice["status"] not in also:
            raise StripeApiError(
                400,
                f"This invoice is {invoice['status']}; the operation needs an open invoice.",
                code="invoice_not_editable" if invoice["status"] == "draft" else "invoice_unexpected_state",
            )
        return invoice

    def invoice_lines(self, invoice_id: str) -> JsonObject:
        return copy.deepcopy(self._get(invoice_id, "invoice")["lines"])

    def list_invoices(self, params: JsonObject) -> JsonObject:
        customer = param_str(params, "customer")
        subscription = param_str(params, "subscription")
        status = param_str(params, "status")
        if status is not None and status not in INVOICE_STATUSES:
            raise StripeApiError(400, f"Invalid status: {status}", param="status")
        found = [
            obj
            for obj in self._newest_first("invoice")
            if customer in (None, obj["customer"])
            and status in (None, obj["status"])
            and (
                subscription is None or obj["parent"]["subscription_details"]["subscription"] == subscription
            )
        ]
        return list_object(copy.deepcopy(found[: self._limit(params)]), "/v1/invoices")

    def pay_invoice(self, invoice_id: str, params: JsonObject) -> JsonObject:
        """``invoices.pay``: a draft is finalized first; ``payment_method`` or the default one,
        ``off_session`` unless told otherwise; a decline is Stripe's 402 (the attempt counts)."""
        invoice = self._get(invoice_id, "invoice")
        out_of_band = param_bool(params, "paid_out_of_band")
        off_session = _optional_bool(params, "off_session")
        with self._at(self._time_of(invoice["test_clock"])):
            customer = self._objects[invoice["customer"]]
            method_id = self._usable_default(customer, param_str(params, "payment_method"), "payment_method")
            if invoice["status"] not in ("draft", "open", "uncollectible"):
                raise StripeApiError(
                    400,
                    f"This invoice is {invoice['status']}; it cannot be paid.",
                    code="invoice_unexpected_state",
                )
            if not out_of_band and (method_id or self._payment_method_for(invoice)) is None:
                raise StripeApiError(400, NO_PAYMENT_METHOD.message, code="resource_missing")
            if invoice["status"] == "draft":
                self._finalize(invoice, collect=False)
            if invoice["status"] != "paid":
                if out_of_band:
                    self._mark_paid(invoice, out_of_band=True)
                else:
                    decline = self._collect(
                        invoice,
                        automatic=False,
                        payment_method_id=method_id,
                        off_session=True if off_session is None else off_session,
                    )
                    if decline is not None:
                        raise self._decline_error(decline)
        return copy.deepcopy(invoice)

    def pay_invoice_with_card(self, invoice_id: str, card_number: str) -> JsonObject:
        """The hosted invoice page's Pay: the typed card, charged with the customer present."""
        invoice = self._open_invoice(invoice_id, also=frozenset({"uncollectible"}))
        card = self._lookup_card(card_number)
        with self._at(self._time_of(invoice["test_clock"])):
            payment_method = self._new_card_payment_method(card)
            decline = self._collect(
                invoice, automatic=False, payment_method_id=payment_method["id"], off_session=False
            )
            if decline is not None:
                raise self._decline_error(decline)
        return copy.deepcopy(invoice)

    def void_invoice(self, invoice_id: str) -> JsonObject:
        invoice = self._open_invoice(invoice_id, also=frozenset({"uncollectible"}))
        with self._at(self._time_of(invoice["test_clock"])):
            self._close(invoice, "void")
        return copy.deepcopy(invoice)

    def mark_invoice_uncollectible(self, invoice_id: str) -> JsonObject:
        invoice = self._open_invoice(invoice_id)
        with self._at(self._time_of(invoice["test_clock"])):
            self._close(invoice, "uncollectible")
        return copy.deepcopy(invoice)

    def finalize_invoice(self, invoice_id: str, params: JsonObject) -> JsonObject:
        invoice = self._get(invoice_id, "invoice")
        if invoice["status"] != "draft":
            raise StripeApiError(
                400,
                f"This invoice is already finalized ({invoice['status']}).",
                code="invoice_unexpected_state",
            )
        auto_advance = _optional_bool(params, "auto_advance")
        with self._at(self._time_of(invoice["test_clock"])):
            if auto_advance is not None:
                invoice["auto_advance"] = auto_advance
            self._finalize(invoice, collect=bool(invoice["auto_advance"]))
        return copy.deepcopy(invoice)

    def create_invoice_preview(self, params: JsonObject) -> JsonObject:
        """``invoices.create_preview`` of a subscription: its next renewal, or with
        ``subscription_details.items`` what that change would bill (now with
        ``always_invoice`` or a new interval, else at the renewal)."""
        subscription_id = param_str(params, "subscription")
        if subscription_id is None:
            raise StripeApiError(
                400,
                "The simulator previews a subscription's invoices only: pass subscription.",
                code="parameter_missing",
                param="subscription",
            )
        subscription = self._get(subscription_id, "subscription", param="subscription")
        customer = param_str(params, "customer")
        if customer is not None and customer != subscription["customer"]:
            raise StripeApiError(400, "The subscription belongs to another customer.", param="customer")
        if subscription["status"] in ENDED:
            raise StripeApiError(
                400, "A canceled subscription has no upcoming invoice.", param="subscription"
            )
        details = param_dict(params, "subscription_details")
        now = self._time_of(subscription["test_clock"])
        pending = copy.deepcopy(self._subscription_states.get(subscription_id, {}).get("pending_lines", []))
        with self._at(now):
            if "items" not in details:
                return self._renewal_preview(subscription, pending)
            future = copy.deepcopy(subscription)  # the change made to a copy, for its invoice
            change = self._item_change(future, details, now)
            bill, pending = self._apply_item_change(future, change, pending)
            if bill is None:
                preview = self._renewal_preview(future, pending)
            else:
                preview = self._with_balance(
                    self._invoice_object(
                        new_id("upcoming_in_"),
                        future,
                        "upcoming",
                        change.at,
                        change.at,
                        bill,
                        auto_advance=True,
                    )
                )
        preview["parent"]["subscription_details"]["subscription_proration_date"] = change.at
        return preview

    # -- checkout in subscription mode ----------------------------------------------------------

    def _recurring_line_items(self, params: JsonObject) -> list[JsonObject]:
        """A subscription-mode session's ``line_items``: recurring prices, checked."""
        chosen = self._items_param(params, "line_items")
        return [
            {
                "id": new_id("li_"),
                "object": "item",
                "amount_discount": 0,
                "amount_subtotal": price["unit_amount"] * quantity,
                "amount_tax": 0,
                "amount_total": price["unit_amount"] * quantity,
                "currency": price["currency"],
                "description": self._product_name(price),
                "price": copy.deepcopy(price),
                "quantity": quantity,
            }
            for price, quantity in chosen
        ]

    @staticmethod
    def _subscription_data(params: JsonObject) -> JsonObject:
        """A subscription-mode session's ``subscription_data``, checked, to keep with it."""
        data = param_dict(params, "subscription_data")
        for trial in ("trial_period_days", "trial_end"):
            if data.get(trial) not in (None, ""):
                raise StripeApiError(
                    400, "The simulator does not model trials.", param=f"subscription_data[{trial}]"
                )
        return {"metadata": param_metadata(data), "description": param_str(data, "description")}

    def _complete_subscription_checkout(
        self, session: JsonObject, card_number: str, *, async_payment: bool = False
    ) -> JsonObject:
        """The hosted page's Subscribe: the card charged for the first invoice of a new
        subscription, saved on the customer as the subscription's default. A declined card is
        refused before anything is made (the page shows it; the session stays open)."""
        if async_payment:
            raise StripeApiError(400, "The simulator's subscriptions are paid by card only.")
        card = self._lookup_card(card_number)
        decline = card.charge_decline(off_session=False)
        if decline is not None:
            raise self._decline_error(decline)
        items = [
            (self._subscribable_price(item["price"]["id"], "line_items"), int(item["quantity"]))
            for item in self._line_items.get(session["id"], [])
        ]
        data = self._checkout_subscriptions.get(session["id"], {"metadata": {}, "description": None})
        if session["customer"] is None:  # Checkout makes one, as Stripe's does in subscription mode
            session["customer"] = self.create_customer({"email": session["customer_email"] or ""})["id"]
        customer = self._get(session["customer"], "customer")
        with self._at(self._time_of(customer.get("test_clock"))):
            payment_method = self._new_card_payment_method(card)
            self._attach(payment_method, customer["id"])
            subscription, invoice = self._start_subscription(
                customer,
                items,
                metadata=dict(data["metadata"]),
                description=data["description"],
                default_payment_method=payment_method["id"],
            )
            if invoice["status"] == "open":
                self._collect(invoice, automatic=False, off_session=False)
            session.update(
                status="complete",
                payment_status="paid",
                subscription=subscription["id"],
                invoice=invoice["id"],
                url=None,
            )
            self._emit("checkout.session.completed", session)
        return copy.deepcopy(session)

    # -- test clocks ----------------------------------------------------------------------------

    def create_test_clock(self, params: JsonObject) -> JsonObject:
        frozen_time = param_int(params, "frozen_time", required=True)
        assert frozen_time is not None
        if not 0 <= frozen_time < 2**40:
            raise StripeApiError(400, "frozen_time must be a Unix time in seconds.", param="frozen_time")
        now = int(self.clock())
        clock = self._store(
            {
                "id": new_id("clock_"),
                "object": TEST_CLOCK,
                "created": now,
                "deletes_after": now + CLOCK_LIFETIME_SECONDS,
                "frozen_time": frozen_time,
                "livemode": False,
                "name": param_str(params, "name"),
                "status": "ready",
                "status_details": {},
            }
        )
        self._emit("test_helpers.test_clock.created", clock)
        return copy.deepcopy(clock)

    def list_test_clocks(self, params: JsonObject) -> JsonObject:
        found = self._newest_first(TEST_CLOCK)
        return list_object(copy.deepcopy(found[: self._limit(params)]), "/v1/test_helpers/test_clocks")

    def advance_test_clock(self, clock_id: str, params: JsonObject) -> JsonObject:
        """Everything due up to ``frozen_time`` happens, in order, at its instant; answered, as
        Stripe does, with the clock ``advancing`` (it is ``ready`` on the next retrieve)."""
        clock = self._get(clock_id, TEST_CLOCK)
        target = param_int(params, "frozen_time", required=True)
        assert target is not None
        frozen = int(clock["frozen_time"])
        if target <= frozen:
            raise StripeApiError(
                400,
                "The frozen_time must be after the test clock's current frozen time.",
                param="frozen_time",
            )
        limit, shortest = self._advance_limit(clock_id, frozen)
        if target > limit:
            raise StripeApiError(
                400,
                f"Cannot advance the test clock more than two intervals of its shortest subscription "
                f"({shortest}) at once: frozen_time must be at most {limit}.",
                param="frozen_time",
            )
        with self._at(frozen):
            clock.update(status="advancing", status_details={"advancing": {"target_frozen_time": target}})
            answer = copy.deepcopy(clock)
            self._emit("test_helpers.test_clock.advancing", clock)
        self._run_due(clock_id, target)
        with self._at(target):
            clock.update(frozen_time=target, status="ready", status_details={})
            self._emit("test_helpers.test_clock.ready", clock)
        return answer

    def _advance_limit(self, clock_id: str, frozen: int) -> tuple[int, str]:
        """How far a clock may move in one advance: two intervals of its shortest live
        subscription, or two years without one (Stripe's limits)."""
        limits = [(shifted(frozen, "year", 2), "no subscription: two years")]
        for obj in self._objects.values():
            if (
                obj.get("object") == "subscription"
                and obj["test_clock"] == clock_id
                and obj["status"] not in ENDED
            ):
                interval, count = _cycle_of(obj["items"]["data"][0]["price"])
                limits.append((shifted(frozen, interval, 2 * count), f"{count} {interval}"))
        return min(limits)

    def delete_test_clock(self, clock_id: str) -> JsonObject:
        """The clock and what lives in it: its customers deleted, their subscriptions canceled."""
        clock = self._get(clock_id, TEST_CLOCK)
        with self._at(int(clock["frozen_time"])):
            for obj in list(self._objects.values()):
                live = obj.get("object") == "subscription" and obj["status"] not in ENDED
                if live and obj["test_clock"] == clock_id:
                    self._end_subscription(
                        self._get(obj["id"], "subscription"), reason="cancellation_requested"
                    )
            for obj in list(self._objects.values()):
                if (
                    obj.get("object") == "customer"
                    and obj.get("test_clock") == clock_id
                    and not obj.get("deleted")
                ):
                    self._emit("customer.deleted", obj)
                    self._store({"id": obj["id"], "object": "customer", "deleted": True})
            self._emit("test_helpers.test_clock.deleted", clock)
        gone = {"id": clock_id, "object": TEST_CLOCK, "deleted": True}
        self._store(gone)
        return dict(gone)


@dataclass
class _ItemChange:
    """A checked ``items`` update: which items go, stay (with their new price and quantity) or
    come, at which instant (``at``), the interval after it, and the invoice lines it makes."""

    at: int
    behavior: str
    recurring: JsonObject
    cycle_changed: bool
    removed: set[str]
    kept: dict[str, tuple[JsonObject, int]]
    added: list[tuple[JsonObject, int]]
    lines: list[JsonObject] = field(default_factory=list)

    @property
    def bill_now(self) -> bool:
        return self.cycle_changed or (self.behavior == "always_invoice" and bool(self.lines))
