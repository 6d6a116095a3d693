"""The ClickHouse side of Tally on a *current* ClickHouse (chDB, the engine in-process):
`scripts/check-dashboards --current-clickhouse` runs it. The stack and the tests use
ClickHouse 18.16 (the only server Debian ships); the SQL must suit both.

Applies schemas/clickhouse/*.sql twice (idempotent), inserts usage rows, checks both
rollups against usage_log, and runs every ClickHouse query of dashboards/grafana/*.json
with the Grafana macros substituted as tests/dashboards.rs does. Exit 1 on any failure.
"""
import glob
import json
import re
import sys
import time

from chdb import session

DB = "tally_check"
s = session.Session()
version = s.query("SELECT version()", "TSVRaw").bytes().decode().strip()
s.query(f"CREATE DATABASE IF NOT EXISTS {DB}")
s.query(f"USE {DB}")
for _ in range(2):
    for path in sorted(glob.glob("schemas/clickhouse/*.sql")):
        s.query(open(path).read())

# 3000 events over 40 days: some failed, some BYOK, some free, 7 accounts, 2 models.
s.query("""
INSERT INTO usage_log (event_id, occurred_at, account_id, api_key_id, project_id, provider,
    model, modality, billing_mode, reason, status, charged, upstream_cost_units, cost_units,
    input_tokens, cached_input_tokens, output_tokens, reasoning_tokens)
SELECT toString(number), now() - number * 1152, concat('acct-', toString(number % 7)), 'k', 'p',
    'openai', if(number % 3 = 0, 'gpt-4o', 'o3'), 'chat',
    if(number % 10 = 0, 'byok', 'platform'),
    multiIf(number % 13 = 0, 'failed_call', number % 10 = 0, 'byok', 'priced'),
    if(number % 13 = 0, 'error', 'success'), toUInt8(number % 13 != 0 AND number % 10 != 0),
    toInt64(number * 3), toInt64(if(number % 13 != 0 AND number % 10 != 0, number * 5, 0)),
    100, 10, 50, 5
FROM numbers(3000)
""")
problems = []
want = s.query("SELECT count(), sum(cost_units), sum(status = 'error') FROM usage_log", "TSVRaw").bytes().decode().split()
for table in ("usage_hourly", "usage_daily"):
    got = s.query(f"SELECT sum(events), sum(cost_units), sum(errors) FROM {table}", "TSVRaw").bytes().decode().split()
    if got != want:
        problems.append(f"{table}: {got} != usage_log {want}")

now = int(time.time())
frm = now - 45 * 86400
day = lambda t: time.strftime("%Y-%m-%d", time.gmtime(t))


def expand(sql, interval):
    sql = re.sub(r"\$__timeFilter\((\w+)\)", lambda m: f"{m[1]} >= toDateTime({frm}) AND {m[1]} <= toDateTime({now})", sql)
    sql = re.sub(r"\$__dateFilter\((\w+)\)", lambda m: f"{m[1]} >= toDate('{day(frm)}') AND {m[1]} <= toDate('{day(now)}')", sql)
    sql = sql.replace("$__fromTime", f"toDateTime({frm})").replace("$__toTime", f"toDateTime({now})")
    return sql.replace("$__interval_s", str(interval))


queries = 0
for path in sorted(glob.glob("dashboards/grafana/*.json")):
    for panel in json.load(open(path))["panels"]:
        for target in panel["targets"]:
            if target["datasource"]["uid"] != "tally-clickhouse":
                continue
            queries += 1
            try:
                rows = json.loads(s.query(expand(target["rawSql"], 3600), "JSON").bytes())["rows"]
                if rows == 0:
                    problems.append(f"{path} / {panel['title']}: no rows")
            except Exception as e:  # noqa: BLE001 - report every failing query
                problems.append(f"{path} / {panel['title']}: {str(e)[:300]}")

for p in problems:
    print(f"check-dashboards: ClickHouse {version}: {p}", file=sys.stderr)
if problems:
    sys.exit(1)
print(f"check-dashboards: ClickHouse {version}: migrations (twice), rollups and {queries} dashboard queries ok")
