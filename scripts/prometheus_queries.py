#!/usr/bin/env python3
"""Prints every PromQL query of the relay's monitoring files, one JSON object a line.

For an end-to-end test in which a real Prometheus scrapes a running relay: each alert
expression of deploy/prometheus/alerts.yaml and each query of deploy/grafana/outbox-relay.json,
with what is needed to assert that it "returns data" on a healthy relay:

  {"kind": "alert", "name": "OutboxRelayNotStreaming", "ref": "",
   "expr": "max by (job) (outbox_relay_role{role=\"streaming\"}) < 1",
   "data_expr": "max by (job) (outbox_relay_role{role=\"streaming\"})",
   "selectors": ["outbox_relay_role{role=\"streaming\"}"],
   "metrics": ["outbox_relay_role"]}
  {"kind": "panel", "name": "Role per instance", "ref": "A", "expr": "...", ...}

- expr: the query as written; for dashboard queries, Grafana's variables are replaced
  ($__rate_interval and $__interval by --rate-interval, $__range by --range, $job by --job,
  $instance by ".*", $DS_PROMETHEUS is not used in queries).
- data_expr: expr with every comparison against a number literal removed (`x > 300` becomes
  `x`, `a == 0 and on (i) b == 1` becomes `a and on (i) b`) and absent(x) replaced by (x).
  Alert expressions are empty on a healthy relay; their data_expr is not, as long as each
  metric they use is exported. Comparisons written with `bool` are kept (they return data).
- selectors: every vector selector in expr (metric name and label matchers as written, range
  dropped); each returns at least one series when the relay exports the metric.
- metrics: the metric names of those selectors.

A test should assert, for each line, that data_expr and each of the selectors return at
least one sample (`up{job="outbox-relay"}` needs the scrape job to be called outbox-relay).

Options: --rule-file PATH also writes every expr, data_expr and selector as recording rules
into PATH, for `promtool check rules` to parse; --require-all-metrics fails (exit 1) when a
query names a metric the relay does not export, or when an exported metric is used by no
query. Standard library only.
"""

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALERTS = os.path.join(ROOT, "deploy", "prometheus", "alerts.yaml")
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "outbox-relay.json")

# What the relay exports (docs/monitoring.md has the table), plus Prometheus' own `up`.
EXPORTED = [
    "outbox_relay_build_info",
    "outbox_relay_role",
    "outbox_relay_leader",
    "outbox_relay_events_published_total",
    "outbox_relay_publish_latency_seconds_bucket",
    "outbox_relay_publish_latency_seconds_sum",
    "outbox_relay_publish_latency_seconds_count",
    "outbox_relay_dead_letters_total",
    "outbox_relay_sink_up",
    "outbox_relay_sink_retries_total",
    "outbox_relay_reconnects_total",
    "outbox_relay_oldest_unacked_event_age_seconds",
    "outbox_relay_in_flight_events",
    "outbox_relay_in_flight_bytes",
    "outbox_relay_sink_checkpoint_lsn_bytes",
    "outbox_relay_received_lsn_bytes",
    "outbox_relay_confirmed_lsn_bytes",
    "outbox_relay_replication_lag_bytes",
    "outbox_relay_last_heartbeat_timestamp_seconds",
    "outbox_relay_decode_errors_total",
    "outbox_relay_unpublished_tables",
]
KNOWN = set(EXPORTED) | {"up"}

KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
            "group_right", "bool", "offset", "atan2"}
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                "count_values", "bottomk", "topk", "quantile"}
COMPARISONS = {"==", "!=", ">=", "<=", ">", "<"}

TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?![\w:]))
  | (?P<ident>[A-Za-z_:][\w:]*)
  | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=])
  | (?P<punct>[(),])
  | (?P<open>[{\[])
""", re.VERBOSE)


class QueryError(Exception):
    pass


def tokenize(expr):
    """(kind, text, start, end) tuples; a {...} or [...] group is one token."""
    tokens, i = [], 0
    while i < len(expr):
        m = TOKEN.match(expr, i)
        if not m:
            raise QueryError(f"cannot read {expr[i:i + 20]!r} in {expr!r}")
        kind = m.lastgroup
        if kind == "open":
            close = "}" if m.group() == "{" else "]"
            j = i + 1
            while j < len(expr) and expr[j] != close:
                if expr[j] in "\"'`":
                    s = TOKEN.match(expr, j)
                    if not s or s.lastgroup != "string":
                        raise QueryError(f"unterminated string in {expr!r}")
                    j = s.end()
                else:
                    j += 1
            if j >= len(expr):
                raise QueryError(f"unclosed {m.group()} in {expr!r}")
            tokens.append(("braces" if close == "}" else "range", expr[i:j + 1], i, j + 1))
            i = j + 1
            continue
        if kind != "space":
            tokens.append((kind, m.group(), i, m.end()))
        i = m.end()
    return tokens


def selectors(expr):
    """The vector selectors of expr, as written, without ranges, in order, without repeats."""
    tokens = tokenize(expr)
    found, i = [], 0
    while i < len(tokens):
        kind, text, _, _ = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if kind == "ident" and text in LABEL_LIST_KEYWORDS:
            # The label list after by/on/...: skip to its closing parenthesis.
            if nxt and nxt[1] == "(":
                depth, i = 0, i + 1
                while i < len(tokens):
                    depth += {"(": 1, ")": -1}.get(tokens[i][1], 0)
                    if depth == 0:
                        break
                    i += 1
            i += 1
            continue
        if kind == "ident" and text not in KEYWORDS and text not in AGGREGATIONS and \
                not (nxt and nxt[1] == "("):
            sel = text
            if nxt and nxt[0] == "braces":
                sel += nxt[1]
                i += 1
            if sel not in found:
                found.append(sel)
        elif kind == "braces":
            if text not in found:
                found.append(text)
        i += 1
    return found


def metric_name(selector):
    m = re.match(r"[A-Za-z_:][\w:]*", selector)
    if m:
        return m.group()
    m = re.search(r"""__name__\s*=\s*["']([^"']*)["']""", selector)
    return m.group(1) if m else ""


def data_expr(expr):
    """expr without comparisons against a number literal, and absent(x) as (x)."""
    tokens = tokenize(expr)
    cut = []  # (start, end) spans of expr to remove
    for i, (kind, text, start, _) in enumerate(tokens):
        if kind == "op" and text in COMPARISONS and i + 1 < len(tokens):
            j = i + 1
            if tokens[j][1] == "bool":
                continue
            if tokens[j][1] in "+-" and j + 1 < len(tokens):
                j += 1
            if tokens[j][0] == "number":
                # From the end of the previous token, so that the spaces before go too.
                begin = tokens[i - 1][3] if i else start
                cut.append((begin, tokens[j][3]))
        elif kind == "ident" and text == "absent" and i + 1 < len(tokens) and tokens[i + 1][1] == "(":
            cut.append((start, tokens[i][3]))
        elif kind == "number" and i + 1 < len(tokens) and tokens[i + 1][1] in COMPARISONS:
            raise QueryError(f"write the number after the comparison in {expr!r}")
    out, pos = [], 0
    for begin, end in cut:
        out.append(expr[pos:begin])
        pos = end
    out.append(expr[pos:])
    return "".join(out)


def read_alerts(path):
    """(name, expr) of every alert, from the style alerts.yaml keeps: `expr:` on one line or
    as a `|` block."""
    alerts, name = [], None
    lines = open(path, encoding="utf-8").read().split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"\s*- alert:\s*(\S+)\s*$", line)
        if m:
            name = m.group(1)
        m = re.match(r"(\s*)expr:\s*(.*?)\s*$", line)
        if m and name:
            indent, value = len(m.group(1)), m.group(2)
            if value in ("|", "|-", "|+"):
                block = []
                i += 1
                while i < len(lines) and (not lines[i].strip() or
                                          len(lines[i]) - len(lines[i].lstrip()) > indent):
                    block.append(lines[i].strip())
                    i += 1
                value = " ".join(part for part in block if part)
                i -= 1
            elif value[:1] in "\"'>":
                raise QueryError(f"{path}: alert {name}: write expr plainly or as a | block")
            alerts.append((name, value))
            name = None
        i += 1
    return alerts


def read_panels(path):
    """(panel title, refId, expr) of every target of every panel, rows' panels included."""
    def walk(panels):
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    dashboard = json.load(open(path, encoding="utf-8"))
    out = []
    for panel in walk(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append((panel.get("title", ""), target.get("refId", ""), target["expr"]))
    return out


def substitute(expr, args):
    values = {
        "__rate_interval": args.rate_interval,
        "__interval": args.rate_interval,
        "__range": args.range,
        "job": args.job,
        "instance": ".*",
    }

    def one(m):
        name = m.group(1) or m.group(2)
        if name not in values:
            raise QueryError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alerts", default=ALERTS)
    parser.add_argument("--dashboard", default=DASHBOARD)
    parser.add_argument("--rate-interval", default="1m", help="for $__rate_interval (1m)")
    parser.add_argument("--range", default="1h", help="for $__range (1h)")
    parser.add_argument("--job", default="outbox-relay", help="for $job (outbox-relay)")
    parser.add_argument("--rule-file", help="also write every query as a recording rule here")
    parser.add_argument("--require-all-metrics", action="store_true")
    args = parser.parse_args()

    try:
        queries = [("alert", name, "", expr) for name, expr in read_alerts(args.alerts)]
        queries += [("panel", title, ref, substitute(expr, args))
                    for title, ref, expr in read_panels(args.dashboard)]
        rows = []
        for kind, name, ref, expr in queries:
            sels = selectors(expr)
            rows.append({
                "kind": kind, "name": name, "ref": ref, "expr": expr,
                "data_expr": data_expr(expr), "selectors": sels,
                "metrics": sorted({metric_name(s) for s in sels}),
            })
    except (QueryError, OSError, ValueError) as err:
        print(f"prometheus_queries: {err}", file=sys.stderr)
        return 1

    for row in rows:
        print(json.dumps(row))

    problems = []
    if args.require_all_metrics:
        used = {m for row in rows for m in row["metrics"]}
        for row in rows:
            for m in row["metrics"]:
                if m not in KNOWN:
                    problems.append(f'{row["kind"]} "{row["name"]}" uses {m!r}, which the relay does not export')
        for m in EXPORTED:
            if m not in used:
                problems.append(f"no alert or dashboard query uses {m}")

    if args.rule_file:
        with open(args.rule_file, "w", encoding="utf-8") as out:
            out.write("groups:\n  - name: queries\n    rules:\n")
            n = 0
            for row in rows:
                for expr in [row["expr"], row["data_expr"]] + row["selectors"]:
                    n += 1
                    out.write(f"      - record: query:{n}\n        expr: {json.dumps(expr)}\n")

    for problem in problems:
        print(f"prometheus_queries: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
