"""Subscriptions in tests: an organization that subscribes to plans in the app's own Stripe
simulator, its Stripe customer living on a Stripe test clock, the app's runtime clock moved
with it.

``Subscriber`` wraps a ``Shop`` (tests/purchasing.py). Made by the ``subscriber`` fixture, it has
already

- created a test clock at ``START`` and a customer on it through the real SDK against the app's
  simulator (the app's own key and in-process transport), and recorded that customer as the
  organization's (``stripe_customers``): the app meets it on first need instead of making one;
- put the app's runtime on a ``ManualClock`` at ``START``.

``advance(to)`` moves both clocks (the runtime's first, so webhooks handled during the advance
read the new time), waits for the deliveries, and runs the lot-expiry duty at the new time (the
database's own ``now()`` is the machine's, far before the test clock). ``hold()`` keeps Stripe's
events to itself; ``release(seed)`` delivers what was held, each event 2 or 3 times, shuffled.
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import httpx
import stripe

from orgwallet.clock import ManualClock
from orgwallet.payments.gateway import STRIPE_API_VERSION, TransportHTTPClient
from orgwallet.payments.runtime import INTERNAL_BASE_URL, SIMULATOR_MOUNT
from orgwallet.payments.simulator.billing import shifted
from orgwallet.runtime import Runtime
from orgwallet.services import wallets
from tests.helpers import add_member, create_org
from tests.purchasing import Shop

DAY = 24 * 3600
HOUR = 3600


def _start() -> int:
    """Noon on the 15th of the month after next (no month-end clipping of periods). Relative to
    the real time because the database's ``now()`` is real: a lot or a coverage that must not
    have ended by it yet (a request's ledger call reads the database's clock) ends after it."""
    today = datetime.now(UTC)
    index = today.month - 1 + 2
    return int(datetime(today.year + index // 12, index % 12 + 1, 15, 12, tzinfo=UTC).timestamp())


START = _start()
STAFF = "root-admin"  # tests/conftest.py's platform admin
API_BASE = INTERNAL_BASE_URL + SIMULATOR_MOUNT
SUCCESS_URL = "https://app.example/billing/subscribed?session={CHECKOUT_SESSION_ID}"
CANCEL_URL = "https://app.example/billing"
GOOD_CARD = "4242424242424242"
DECLINES_LATER = "4000000000000341"  # attaches, then every charge is declined
DECLINED_CARD = "4000000000000002"

_names = itertools.count()


def month(n: int, anchor: int = START) -> int:
    """The n-th monthly period end from ``anchor`` (Stripe's billing cycle)."""
    return shifted(anchor, "month", n)


def at(instant: int) -> datetime:
    return datetime.fromtimestamp(instant, UTC)


def epoch(value: str | datetime | None) -> int | None:
    """A GraphQL DateTime (or a datetime) as Unix seconds."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return int(value.timestamp())


def round_half_up(value: Fraction) -> int:
    return int(value + Fraction(1, 2)) if value >= 0 else -int(-value + Fraction(1, 2))


def prorated_tokens(old: int, new: int, changed_at: int, period_start: int, period_end: int) -> int:
    """The spec's upgrade grant: the difference prorated by the seconds left in the period."""
    return round_half_up(Fraction((new - old) * (period_end - changed_at), period_end - period_start))


def stripe_rounded(value: Fraction) -> int:
    """Stripe's proration rounding (half away from zero), as the simulator documents it."""
    return round_half_up(value)


def prorated_amount(old: int, new: int, changed_at: int, period_start: int, period_end: int) -> int:
    """What an upgrade's invoice charges: the new price's rest less the old price's rest."""
    left, whole = period_end - changed_at, period_end - period_start
    return stripe_rounded(Fraction(-old * left, whole)) + stripe_rounded(Fraction(new * left, whole))


# ---------------------------------------------------------------- GraphQL

PLAN_FIELDS = (
    "id code name tokensPerPeriod unlimited interval intervalCount priceMinor currency rollover rolloverCap"
)
CREATE_PLAN = f"""
mutation($input: CreatePlanInput!) {{
  createPlan(input: $input) {{
    __typename
    ... on PlanSaved {{ plan {{ {PLAN_FIELDS} }} }}
    ... on UserError {{ code message }}
  }}
}}
"""
UPDATE_PLAN = """
mutation($input: UpdatePlanInput!) {
  updatePlan(input: $input) { __typename ... on UserError { code message } }
}
"""

INVOICE_FIELDS = """
  id amountMinor currency status billingReason periodStart periodEnd tokensGranted hostedInvoiceUrl paidAt
"""
SUBSCRIPTION_FIELDS = f"""
  id status currentPeriodStart currentPeriodEnd cancelAtPeriodEnd canceledAt pausedAt graceEndsAt createdAt
  organization {{ id }}
  plan {{ id code tokensPerPeriod priceMinor }}
  scheduledPlan {{ id code }}
  invoices(first: 50) {{ edges {{ node {{ {INVOICE_FIELDS} }} }} }}
"""
SUBSCRIBE = """
mutation($input: SubscribeInput!) {
  subscribe(input: $input) {
    __typename
    ... on SubscriptionCheckoutStarted { checkoutUrl }
    ... on UserError { code message }
    ... on InvalidInput { field }
  }
}
"""
CHANGE_PLAN = f"""
mutation($input: ChangePlanInput!) {{
  changePlan(input: $input) {{
    __typename
    ... on SubscriptionChanged {{ subscription {{ {SUBSCRIPTION_FIELDS} }} }}
    ... on UserError {{ code message }}
    ... on InvalidInput {{ field }}
  }}
}}
"""


def _change(name: str, input_type: str) -> str:
    return f"""
mutation($input: {input_type}!) {{
  {name}(input: $input) {{
    __typename
    ... on SubscriptionChanged {{ subscription {{ {SUBSCRIPTION_FIELDS} }} }}
    ... on UserError {{ code message }}
  }}
}}
"""


PAUSE = _change("pauseSubscription", "SubscriptionIdInput")
RESUME = _change("resumeSubscription", "SubscriptionIdInput")
CANCEL = _change("cancelSubscription", "CancelSubscriptionInput")
ORGANIZATION_SUBSCRIPTION = f"""
query($id: ID!) {{ organization(id: $id) {{ subscription {{ {SUBSCRIPTION_FIELDS} }} }} }}
"""
NODE = f"query($id: ID!) {{ node(id: $id) {{ ... on TokenSubscription {{ {SUBSCRIPTION_FIELDS} }} }} }}"
CONSUME = """
mutation($org: ID!, $amount: BigInt!, $key: String!) {
  consumeTokens(input: {organizationId: $org, amount: $amount, idempotencyKey: $key}) {
    __typename
    ... on TokensConsumed { replayed entry { id kind amount } wallet { balance } }
    ... on InsufficientTokens { requested available }
    ... on UserError { code message }
  }
}
"""
GRANT = """
mutation($org: ID!, $amount: BigInt!, $key: String!) {
  grantTokens(input: {organizationId: $org, amount: $amount, reason: "welcome", idempotencyKey: $key}) {
    __typename ... on UserError { code message }
  }
}
"""
SUSPEND = """
mutation($org: ID!) {
  suspendWallet(input: {organizationId: $org, reason: "fraud review"}) {
    __typename ... on UserError { code }
  }
}
"""
WALLET = """
query($id: ID!) {
  organization(id: $id) {
    wallet {
      status balance reserved lifetimeGranted lifetimeConsumed lifetimeExpired
      grants { source amount remaining expiresAt }
    }
  }
}
"""


@dataclass
class Subscriber:
    """One organization (its owner acting) subscribing through the app, on a Stripe test clock."""

    shop: Shop
    sdk: stripe.StripeClient
    clock_id: str
    customer_id: str
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)
    _held_from: int | None = None

    # -- making one ------------------------------------------------------------------------------

    @classmethod
    async def create(
        cls, shop: Shop, sdk: stripe.StripeClient, *, start: int = START, customer: bool = True
    ) -> Subscriber:
        """The organization's Stripe customer on a new test clock at ``start`` (recorded as its
        customer unless ``customer`` is False), the runtime's clock at ``start``."""
        clock = await sdk.v1.test_helpers.test_clocks.create_async(
            {"frozen_time": start, "name": f"subscriber {shop.owner}"}
        )
        created = await sdk.v1.customers.create_async(
            {
                "name": f"Buyer {shop.owner}",
                "test_clock": clock.id,
                "metadata": {"organization_id": str(shop.org_id)},
            }
        )
        if customer:
            await shop.sql_write(
                "INSERT INTO stripe_customers (organization_id, customer_id) VALUES (:org, :customer)",
                org=shop.org_id,
                customer=created.id,
            )
        shop.app.state.runtime.clock = ManualClock(at(start))
        made = cls(shop, sdk, clock.id, created.id)
        await made.sweep()  # what expired before ``start`` (a new organization's trial tokens)
        return made

    async def another(self) -> Subscriber:
        """A second organization (another owner) on its own test clock at ``START``, in the
        same app, with the same plans."""
        owner = f"subscriber-{next(_names)}"
        org = await create_org(self.shop.client, owner, name=f"Buyer {owner}")
        shop = Shop(self.shop.app, self.shop.client, self.shop.browser, org, owner)
        other = await Subscriber.create(shop, self.sdk)
        other.plans = self.plans
        return other

    # -- the pieces --------------------------------------------------------------------------------

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.shop.app.state.runtime
        return runtime

    @property
    def clock(self) -> ManualClock:
        clock = self.runtime.clock
        assert isinstance(clock, ManualClock)
        return clock

    @property
    def now(self) -> int:
        return int(self.clock.now().timestamp())

    @property
    def org(self) -> str:
        return self.shop.org

    @property
    def owner(self) -> str:
        return self.shop.owner

    async def data(self, query: str, variables: dict[str, Any], as_: str | None = None) -> Any:
        return await self.shop.client.data(query, variables, as_=as_ or self.owner)

    async def raw(self, query: str, variables: dict[str, Any], **kw: Any) -> dict[str, Any]:
        if "as_" not in kw and "bearer" not in kw:
            kw["as_"] = self.owner
        return await self.shop.client.raw(query, variables, **kw)

    async def sql(self, statement: str, **params: Any) -> list[Any]:
        return await self.shop.sql(statement, **params)

    async def add_member(self, subject: str, role: str) -> None:
        await add_member(self.shop.client, self.org, subject=subject, role=role, as_=self.owner)

    # -- plans (platform staff) ---------------------------------------------------------------------

    async def plan(
        self,
        code: str,
        tokens: int = 1000,
        price: int = 1000,
        *,
        interval: str = "MONTH",
        **extra: Any,
    ) -> dict[str, Any]:
        """A plan made by staff through createPlan (its fields); remembered by code."""
        variables = {
            "code": code,
            "name": code.replace("-", " ").title(),
            "tokensPerPeriod": tokens,
            "interval": interval,
            "priceMinor": price,
            **extra,
        }
        result = (await self.data(CREATE_PLAN, {"input": variables}, as_=STAFF))["createPlan"]
        assert result["__typename"] == "PlanSaved", result
        plan: dict[str, Any] = result["plan"]
        self.plans[code] = plan
        return plan

    def plan_id(self, code: str) -> str:
        return str(self.plans[code]["id"])

    async def archive_plan(self, code: str) -> None:
        variables = {"input": {"planId": self.plan_id(code), "active": False}}
        result = (await self.data(UPDATE_PLAN, variables, as_=STAFF))["updatePlan"]
        assert result["__typename"] == "PlanSaved", result

    # -- subscribing -----------------------------------------------------------------------------------

    async def subscribe(
        self,
        code: str | None = None,
        *,
        plan_id: str | None = None,
        key: str | None = None,
        as_: str | None = None,
        bearer: str | None = None,
        raw: bool = False,
        **extra: Any,
    ) -> dict[str, Any]:
        """The result of ``subscribe`` (the whole response body with ``raw``)."""
        variables = {
            "organizationId": self.org,
            "planId": plan_id if plan_id is not None else self.plan_id(str(code)),
            "successUrl": SUCCESS_URL,
            "cancelUrl": CANCEL_URL,
            "idempotencyKey": key,
        } | extra
        who: dict[str, Any] = {"bearer": bearer} if bearer is not None else {"as_": as_ or self.owner}
        body = await self.shop.client.raw(SUBSCRIBE, {"input": variables}, **who)
        if raw:
            return body
        assert not body.get("errors"), body
        result: dict[str, Any] = body["data"]["subscribe"]
        return result

    async def checkout_url(self, code: str, **kwargs: Any) -> str:
        result = await self.subscribe(code, **kwargs)
        assert result["__typename"] == "SubscriptionCheckoutStarted", result
        return str(result["checkoutUrl"])

    async def press(self, url: str, card: str = GOOD_CARD, action: str = "pay") -> httpx.Response:
        """Submits a hosted page's form (Checkout or an invoice), as a browser would."""
        return await self.shop.browser.post(url, data={"card_number": card, "action": action})

    async def start(self, code: str, card: str = GOOD_CARD, **kwargs: Any) -> dict[str, Any]:
        """Subscribes as the SPA does: subscribe, the browser pays on the hosted Checkout page
        and is sent back to the success URL, Stripe's webhooks land. The subscription now."""
        url = await self.checkout_url(code, **kwargs)
        paid = await self.press(url, card)
        assert paid.status_code == 303, paid.text
        assert paid.headers["location"].startswith("https://app.example/billing/subscribed?session=cs_")
        await self.drain()
        return await self.subscription()

    # -- reading -------------------------------------------------------------------------------------

    async def subscription(self, as_: str | None = None) -> dict[str, Any]:
        """``organization.subscription``, which must exist."""
        found = await self.current(as_=as_)
        assert found is not None, "the organization has no live subscription"
        return found

    async def current(self, as_: str | None = None) -> dict[str, Any] | None:
        data = await self.data(ORGANIZATION_SUBSCRIPTION, {"id": self.org}, as_=as_)
        found: dict[str, Any] | None = data["organization"]["subscription"]
        return found

    async def node(self, subscription_id: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = (await self.data(NODE, {"id": subscription_id}))["node"]
        return found

    async def subscription_id(self) -> str:
        return str((await self.subscription())["id"])

    async def row(self) -> Any:
        """The organization's newest subscription row."""
        rows = await self.sql(
            "SELECT * FROM subscriptions WHERE organization_id = :org ORDER BY created_at DESC, id DESC",
            org=self.shop.org_id,
        )
        assert rows, "no subscription row"
        return rows[0]

    async def stripe_subscription(self) -> stripe.Subscription:
        row = await self.row()
        assert row.stripe_subscription_id is not None
        return await self.sdk.v1.subscriptions.retrieve_async(row.stripe_subscription_id)

    async def stripe_invoices(self) -> list[stripe.Invoice]:
        """Stripe's invoices of the newest subscription, oldest first."""
        row = await self.row()
        listed = await self.sdk.v1.invoices.list_async(
            {"subscription": row.stripe_subscription_id, "limit": 100}
        )
        return list(reversed(listed.data))

    async def wallet(self) -> dict[str, Any]:
        found: dict[str, Any] = (await self.data(WALLET, {"id": self.org}))["organization"]["wallet"]
        return found

    async def balance(self) -> int:
        return int((await self.wallet())["balance"])

    async def wallet_status(self) -> str:
        return str((await self.wallet())["status"])

    async def lots(self) -> list[tuple[str, int, int, int | None, int | None, int | None]]:
        """Every credit lot: (source, amount, remaining, expires_at, period_start, period_end),
        times in Unix seconds, in the order they were made."""
        rows = await self.sql(
            """
            SELECT l.source, l.amount, l.remaining, l.expires_at, l.period_start, l.period_end
            FROM credit_lots l JOIN wallets w ON w.id = l.wallet_id
            WHERE w.organization_id = :org ORDER BY l.seq
            """,
            org=self.shop.org_id,
        )
        return [
            (
                str(r.source),
                int(r.amount),
                int(r.remaining),
                epoch(r.expires_at),
                epoch(r.period_start),
                epoch(r.period_end),
            )
            for r in rows
        ]

    async def entries(self, *kinds: str) -> list[tuple[str, int]]:
        """(kind, amount) of the wallet's ledger entries, in order (``kinds``: only these)."""
        rows = await self.sql(
            """
            SELECT e.kind, e.amount FROM ledger_entries e JOIN wallets w ON w.id = e.wallet_id
            WHERE w.organization_id = :org ORDER BY e.seq
            """,
            org=self.shop.org_id,
        )
        return [(str(r.kind), int(r.amount)) for r in rows if not kinds or r.kind in kinds]

    async def grants(self) -> list[int]:
        return [amount for _, amount in await self.entries("subscription_grant")]

    async def notifications(self, *kinds: str) -> list[tuple[str, Any]]:
        """(KIND, data) of the organization's notifications, oldest first: of ``kinds``, or by
        default those of subscriptions and of the wallet's status."""
        rows = await self.sql(
            "SELECT kind, data FROM notifications WHERE organization_id = :org ORDER BY id",
            org=self.shop.org_id,
        )
        wanted = {kind.lower() for kind in kinds}

        def shown(kind: str) -> bool:
            if wanted:
                return kind in wanted
            return kind.startswith("subscription_") or kind in ("wallet_suspended", "wallet_reactivated")

        return [(str(r.kind).upper(), r.data) for r in rows if shown(str(r.kind))]

    async def notification_kinds(self, *kinds: str) -> list[str]:
        return [kind for kind, _ in await self.notifications(*kinds)]

    async def audit(self, prefix: str = "subscription.") -> list[Any]:
        """Audit rows of the organization whose action starts with ``prefix``, oldest first."""
        rows = await self.sql(
            "SELECT action, actor, target_type, target_id, before, after FROM audit_log"
            " WHERE organization_id = :org ORDER BY at, id",
            org=self.shop.org_id,
        )
        return [r for r in rows if str(r.action).startswith(prefix)]

    # -- acting ---------------------------------------------------------------------------------------

    async def change_plan(self, code: str, as_: str | None = None) -> dict[str, Any]:
        variables = {"input": {"subscriptionId": await self.subscription_id(), "planId": self.plan_id(code)}}
        result: dict[str, Any] = (await self.data(CHANGE_PLAN, variables, as_=as_))["changePlan"]
        return result

    async def pause(self, subscription_id: str | None = None) -> dict[str, Any]:
        variables = {"input": {"subscriptionId": subscription_id or await self.subscription_id()}}
        result: dict[str, Any] = (await self.data(PAUSE, variables))["pauseSubscription"]
        return result

    async def resume(self, subscription_id: str | None = None) -> dict[str, Any]:
        variables = {"input": {"subscriptionId": subscription_id or await self.subscription_id()}}
        result: dict[str, Any] = (await self.data(RESUME, variables))["resumeSubscription"]
        return result

    async def cancel(
        self, *, at_period_end: bool = True, subscription_id: str | None = None
    ) -> dict[str, Any]:
        variables = {
            "input": {
                "subscriptionId": subscription_id or await self.subscription_id(),
                "atPeriodEnd": at_period_end,
            }
        }
        result: dict[str, Any] = (await self.data(CANCEL, variables))["cancelSubscription"]
        return result

    async def consume(self, amount: int, key: str | None = None, as_: str | None = None) -> dict[str, Any]:
        variables = {"org": self.org, "amount": amount, "key": key or f"use-{uuid.uuid4()}"}
        result: dict[str, Any] = (await self.data(CONSUME, variables, as_=as_))["consumeTokens"]
        return result

    async def spend(self, amount: int) -> None:
        result = await self.consume(amount)
        assert result["__typename"] == "TokensConsumed", result

    async def give(self, amount: int) -> None:
        """Staff grant ``amount`` promotional tokens (no expiry)."""
        variables = {"org": self.org, "amount": amount, "key": f"gift-{uuid.uuid4()}"}
        result = (await self.data(GRANT, variables, as_=STAFF))["grantTokens"]
        assert result["__typename"] == "TokensGranted", result

    async def staff_suspend(self) -> None:
        result = (await self.data(SUSPEND, {"org": self.org}, as_=STAFF))["suspendWallet"]
        assert result["__typename"] == "WalletStatusChanged", result

    async def set_card(self, card: str) -> str:
        """The customer's default card (and its subscriptions'), as Stripe's billing portal
        changes it: the simulator's test control. The new payment method's id."""
        response = await self.shop.browser.post(
            f"{API_BASE}/test/customers/{self.customer_id}/default_payment_method",
            json={"card_number": card},
            headers={"Authorization": f"Bearer {self.runtime.settings.simulator_secret_key}"},
        )
        assert response.status_code == 200, response.text
        await self.drain()
        return str(response.json()["id"])

    async def pay_invoice_page(self, url: str, card: str = GOOD_CARD) -> httpx.Response:
        """Pays an open invoice on its hosted page, as a browser would; then the webhooks land."""
        response = await self.press(url, card)
        await self.drain()
        return response

    # -- time ---------------------------------------------------------------------------------------

    async def advance(self, to: int, *, sweep: bool = True) -> None:
        """Both clocks to ``to``: the runtime's first (webhooks handled meanwhile read it), then
        Stripe's test clock (all that falls due happens, each at its instant, with its events);
        the deliveries are awaited and, with ``sweep``, lots past their expiry are returned, as
        the expiry duty would at that time."""
        self.clock.set(at(to))
        answer = await self.sdk.v1.test_helpers.test_clocks.advance_async(self.clock_id, {"frozen_time": to})
        assert answer.status == "advancing"
        ready = await self.sdk.v1.test_helpers.test_clocks.retrieve_async(self.clock_id)
        assert (ready.status, ready.frozen_time) == ("ready", to)
        await self.drain()
        if sweep:
            await self.sweep()

    def set_clock(self, to: int) -> None:
        """Only the runtime's clock (Stripe's test clock stays)."""
        self.clock.set(at(to))

    async def sweep(self) -> None:
        await wallets.sweep_expired(self.runtime.sessions, now=self.clock.now())

    async def drain(self) -> None:
        await self.shop.simulator.drain(20)

    # -- duties ---------------------------------------------------------------------------------------

    async def end_grace(self) -> Any:
        from orgwallet.services import subscriptions

        return await subscriptions.end_grace(self.runtime, self.clock.now())

    async def send_reminders(self) -> Any:
        from orgwallet.services import subscriptions

        return await subscriptions.send_reminders(self.runtime, self.clock.now())

    # -- webhooks held back, then delivered out of order ---------------------------------------------

    async def hold(self) -> None:
        """Stripe keeps its events (recorded, not delivered) until ``release``."""
        await self.drain()
        self._held_from = len(await self.shop.simulator.events())
        self.shop.simulator.enabled_events = frozenset()

    async def held(self) -> list[dict[str, Any]]:
        assert self._held_from is not None, "nothing is held"
        return list((await self.shop.simulator.events())[self._held_from :])

    async def release(self, seed: int | None) -> list[str]:
        """Delivers what was held since ``hold``: ``seed`` None, each once in order; else each
        event 2 or 3 times, in an order shuffled by ``random.Random(seed)`` (copies that end up
        side by side are delivered at once, concurrently). Then the expiry duty runs. The types
        as they were delivered."""
        events = await self.held()
        self.shop.simulator.enabled_events = None
        self._held_from = None
        if seed is None:
            order = [event["id"] for event in events]
        else:
            rng = random.Random(seed)
            order = [event["id"] for event in events for _ in range(rng.choice((2, 3)))]
            rng.shuffle(order)
        types = {event["id"]: event["type"] for event in events}
        delivered: list[str] = []
        for event_id, copies in itertools.groupby(order):
            times = len(list(copies))
            await self.shop.simulator.redeliver(event_id, times=times)
            await self.drain()
            delivered += [types[event_id]] * times
        await self.sweep()
        return delivered

    @asynccontextmanager
    async def step(self, seed: int | None) -> AsyncIterator[None]:
        """A step of a life. ``seed`` None: Stripe's events are delivered as they happen; else
        they are held during the block, then delivered duplicated and shuffled by ``seed``."""
        if seed is None:
            yield
            await self.drain()
            return
        await self.hold()
        try:
            yield
        except BaseException:
            self.shop.simulator.enabled_events = None
            raise
        await self.release(seed)

    # -- a whole state, to compare lives ---------------------------------------------------------------

    async def state(self) -> dict[str, Any]:
        """What a life ended in, without ids: the subscription(s), their invoices, the wallet
        (balance, lifetime granted and expired), its lots, its grant entries, and the kinds of
        notifications sent about them."""
        subscriptions = await self.sql(
            """
            SELECT s.id, s.status, p.code AS plan, sp.code AS scheduled, s.current_period_start,
                   s.current_period_end, s.cancel_at_period_end, s.canceled_at, s.paused_at,
                   s.grace_ends_at
            FROM subscriptions s JOIN subscription_plans p ON p.id = s.plan_id
            LEFT JOIN subscription_plans sp ON sp.id = s.scheduled_plan_id
            WHERE s.organization_id = :org ORDER BY s.created_at, s.id
            """,
            org=self.shop.org_id,
        )
        lives = []
        for s in subscriptions:
            invoices = await self.sql(
                """
                SELECT status, billing_reason, amount_minor, period_start, period_end, tokens_granted, paid_at
                FROM subscription_invoices WHERE subscription_id = :id
                ORDER BY period_start, period_end, billing_reason
                """,
                id=s.id,
            )
            lives.append(
                {
                    "status": s.status,
                    "plan": s.plan,
                    "scheduled": s.scheduled,
                    "period": (epoch(s.current_period_start), epoch(s.current_period_end)),
                    "cancel_at_period_end": s.cancel_at_period_end,
                    "canceled_at": epoch(s.canceled_at),
                    "paused_at": epoch(s.paused_at),
                    "grace_ends_at": epoch(s.grace_ends_at),
                    "invoices": [
                        (
                            i.status,
                            i.billing_reason,
                            int(i.amount_minor),
                            epoch(i.period_start),
                            epoch(i.period_end),
                            int(i.tokens_granted),
                            epoch(i.paid_at),
                        )
                        for i in invoices
                    ],
                }
            )
        wallet = await self.wallet()
        return {
            "subscriptions": lives,
            "wallet": {k: wallet[k] for k in ("status", "balance", "lifetimeGranted", "lifetimeExpired")},
            # By period (the order grants came in is the order of the events); the trial lot's
            # expiry is in real time.
            "lots": sorted(lot for lot in await self.lots() if lot[0] != "trial"),
            "grants": sorted(await self.grants()),
            # Each exactly once per cause, however often and in whatever order events came.
            "notifications": sorted(await self.notification_kinds()),
        }


def sdk_for(shop: Shop) -> tuple[stripe.StripeClient, TransportHTTPClient]:
    """The real SDK on the app's own simulator (its key, in process): what the app's gateway
    uses, for what a test does as Stripe's dashboard would (test clocks, customers)."""
    http_client = TransportHTTPClient(httpx.ASGITransport(app=shop.app))
    client = stripe.StripeClient(
        shop.app.state.runtime.settings.simulator_secret_key,
        stripe_version=STRIPE_API_VERSION,
        base_addresses={"api": API_BASE},
        http_client=http_client,
        max_network_retries=0,
    )
    return client, http_client
