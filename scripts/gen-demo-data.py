#!/usr/bin/env python3
"""Regenerates testdata/demo/*.ndjson and expected.json (deterministic).

Each line is a job for POST /v1/jobs in NDJSON form. The stand-ins the demo
starts reject some records on purpose, so the summary shows every outcome:
  webhook (HTTP, single mode): ids starting with "reject-" get HTTP 400.
  warehouse (HTTP, batch mode): everything succeeds; the demo also inserts
      a few malformed payloads straight into the store, as an upstream SQL
      insert might, and they are aborted with transform_failed.
  marketo-leads: emails at bounce.example fail per row (record_rejected),
      emails at warn.example import with a warning (succeeded, note kept),
      leads without an email are aborted (transform_failed).
  klaviyo-profiles: emails ending in @invalid fail Klaviyo's validation (the
      request is retried without them), emails at suppressed.example fail
      inside the import (import-errors), profiles without an identifier are
      aborted (transform_failed).
  sftp-drop (only when OpenSSH's sshd is installed): CSV files on a real
      server; records whose `action` is not a string are aborted.
Some lines repeat a messageId: the API answers them as duplicates.
"""
import json, os, random

random.seed(7)
here = os.path.join(os.path.dirname(__file__), "..", "testdata", "demo")
first = ["Ann", "Bo", "Chen", "Dana", "Eli", "Farah", "Gus", "Hana", "Ivo", "Jun"]
events = ["signup", "login", "purchase", "refund", "logout"]
expected = {}

def write(name, lines):
    with open(os.path.join(here, name), "w") as f:
        for l in lines:
            f.write(json.dumps(l, separators=(",", ":")) + "\n")

# webhook: 1,200 events, 24 rejected, 6 repeated message ids
lines = []
for i in range(1200):
    rid = f"reject-{i}" if i % 50 == 7 else f"evt-{i}"
    lines.append({"destinationId": "webhook", "messageId": f"wh-{i}",
                  "payload": {"id": rid, "event": random.choice(events), "user": f"u{i % 300}",
                              "amount": round(random.random() * 100, 2), "at": 1700000000 + i}})
dups = [dict(l) for l in lines[100:106]]
write("webhook.ndjson", lines + dups)
expected["webhook"] = {"succeeded": 1200 - 24, "aborted": 24}

# warehouse: 1,500 rows in batch mode
lines = [{"destinationId": "warehouse", "payload": {"id": f"row-{i}", "table": "orders",
          "qty": i % 7, "total": i * 3, "paid": i % 3 == 0}} for i in range(1500)]
write("warehouse.ndjson", lines)
expected["warehouse"] = {"succeeded": 1500, "aborted": 5}  # 5 malformed inserted by the demo

# marketo-leads: 1,000 leads
lines = []
bounce = warn = noemail = 0
for i in range(1000):
    p = {"firstName": random.choice(first), "lastName": f"L{i}", "score": i % 100, "vip": i % 9 == 0}
    if i % 100 == 13:
        noemail += 1
    elif i % 40 == 5:
        p["email"] = f"lead{i}@bounce.example"; bounce += 1
    elif i % 45 == 9:
        p["email"] = f"Lead{i}@Warn.Example"; warn += 1
    else:
        p["email"] = f"lead{i}@example.com"
    lines.append({"destinationId": "marketo-leads", "messageId": f"mk-{i}", "payload": p})
write("marketo.ndjson", lines)
expected["marketo-leads"] = {"succeeded": 1000 - bounce - noemail, "aborted": bounce + noemail, "notes": warn}

# klaviyo-profiles: 800 profiles
lines = []
invalid = suppressed = noid = 0
for i in range(800):
    p = {"first_name": random.choice(first), "properties": {"plan": random.choice(["free", "pro"]), "visits": i % 17}}
    if i % 200 == 3:
        noid += 1
    elif i % 50 == 11:
        p["email"] = f"p{i}@invalid"; invalid += 1
    elif i % 60 == 17:
        p["email"] = f"p{i}@suppressed.example"; suppressed += 1
    else:
        p["email"] = f"p{i}@example.com"
        if i % 3 == 0:
            p["phone_number"] = f"+1555{i:07d}"
    lines.append({"destinationId": "klaviyo-profiles", "messageId": f"kl-{i}", "payload": p})
write("klaviyo.ndjson", lines)
expected["klaviyo-profiles"] = {"succeeded": 800 - invalid - suppressed - noid, "aborted": invalid + suppressed + noid}

# sftp-drop: 400 record events (CSV files on a real OpenSSH server), 4 with
# an `action` that is not a string (aborted, transform_failed)
lines = []
for i in range(400):
    action = 7 if i % 100 == 42 else random.choice(["insert", "update"])
    lines.append({"destinationId": "sftp-drop", "payload": {"type": "record", "action": action,
                  "fields": {"id": f"rec-{i}", "name": random.choice(first), "balance": i * 10.5,
                             "active": i % 4 != 0}}})
write("sftp.ndjson", lines)
expected["sftp-drop"] = {"succeeded": 396, "aborted": 4}

with open(os.path.join(here, "expected.json"), "w") as f:
    json.dump(expected, f, indent=2, sort_keys=True)
    f.write("\n")
print(json.dumps(expected))
