#!/usr/bin/env python3
"""An example external connector for `kind = "exec"`: orders of a web shop as KPI events.

It reads a JSON-lines file of orders (a stand-in for a shop's API), e.g.
  {"order_id": 17, "customer": "C-9", "amount": "99.90", "currency": "EUR",
   "placed_at": "2026-11-25T10:00:00Z", "updated_at": "2026-11-25T10:00:00Z",
   "lead_id": "L-3", "status": "paid"}
and prints, one JSON message per line (see the protocol in the README):
  - a `deal.won` per paid order and a `deal.lost` per refunded one, only for orders updated
    since the cursor (`state.updated_after`), with ids derived from the order and its status;
  - a `spend` line per day of the window for the marketplace commission (`fee_rate` of the
    day's paid orders), re-read every run, so a day that changes is restated;
  - the new cursor as a `state` message, and a `log` message.

Request on stdin: {"connector", "tenant", "since", "until", "state", "params", "check"}.
Params (under [connectors.params.settings]): orders_file, fee_rate (default 0.02).
Only the standard library is used.
"""
import json
import sys
from datetime import date
from decimal import Decimal, ROUND_HALF_UP


def emit(message):
    print(json.dumps(message), flush=True)


def main():
    request = json.loads(sys.stdin.readline())
    params = request.get("params") or {}
    state = request.get("state") or {}
    updated_after = state.get("updated_after", "")
    fee_rate = Decimal(str(params.get("fee_rate", "0.02")))
    since = date.fromisoformat(request["since"])
    until = date.fromisoformat(request["until"])

    with open(params["orders_file"], encoding="utf-8") as orders_file:
        # The file is a change log: the last line of an order is its current version.
        latest = {}
        for line in orders_file:
            if line.strip():
                order = json.loads(line)
                latest[order["order_id"]] = order
        orders = sorted(latest.values(), key=lambda order: order["order_id"])

    if request.get("check"):
        emit({"type": "log", "level": "info", "message": f"{len(orders)} orders readable"})
        return

    emit({"type": "log", "level": "info", "message": f"resuming after {updated_after or 'the beginning'}"})
    newest = updated_after
    fees = {}
    for order in orders:
        placed = order["placed_at"]
        day = date.fromisoformat(placed[:10])
        paid = order.get("status", "paid") == "paid"
        if paid and since <= day <= until:
            fees[day] = fees.get(day, Decimal("0")) + Decimal(order["amount"])
        # RFC 3339 times in UTC with the same format compare as strings.
        if order["updated_at"] <= updated_after:
            continue
        newest = max(newest, order["updated_at"])
        status = "paid" if paid else "refunded"
        event = {
            "specversion": "1.0",
            "id": f"shop-order-{order['order_id']}-{status}",
            "source": "example-shop",
            "type": "deal.won" if paid else "deal.lost",
            "time": placed if paid else order["updated_at"],
            "data": {"deal_id": f"order-{order['order_id']}"},
        }
        if paid:
            event["data"].update(
                customer_id=order["customer"], amount=order["amount"], currency=order["currency"]
            )
        if order.get("lead_id"):
            event["data"]["lead_id"] = order["lead_id"]
        emit({"type": "event", "event": event})

    for day, total in sorted(fees.items()):
        fee = (total * fee_rate).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
        emit({"type": "spend", "spend": {"date": day.isoformat(), "amount": str(fee), "currency": "EUR",
                                          "channel": "marketplace", "category": "media",
                                          "source": "example-shop", "account": "commission"}})
    emit({"type": "state", "state": {"updated_after": newest}})
    print(f"done, cursor at {newest}", file=sys.stderr)


if __name__ == "__main__":
    main()
