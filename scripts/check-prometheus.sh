#!/usr/bin/env bash
# Checks the monitoring files without a running relay:
#   - deploy/prometheus/alerts.yaml passes `promtool check rules` and its unit tests
#     (deploy/prometheus/alerts_test.yaml, `promtool test rules`);
#   - deploy/prometheus/prometheusrule.yaml is exactly what this script renders from alerts.yaml
#     (`scripts/check-prometheus.sh --update` rewrites it);
#   - deploy/grafana/outbox-relay.json parses, and every query in it, every alert expression and
#     the forms that scripts/prometheus_queries.py derives from them are valid PromQL, name only
#     metrics the relay exports, and together use every one of them.
# Installs Debian's prometheus package when promtool is missing; the package's service is
# neither started nor left running.
set -euo pipefail

cd "$(dirname "$0")/.."
ALERTS=deploy/prometheus/alerts.yaml
TESTS=deploy/prometheus/alerts_test.yaml
OPERATOR=deploy/prometheus/prometheusrule.yaml
DASHBOARD=deploy/grafana/outbox-relay.json
QUERIES=scripts/prometheus_queries.py

# The PrometheusRule: a fixed header, then alerts.yaml from `groups:` on, indented under `spec:`.
render_prometheusrule() {
  cat <<'HEADER'
# Generated from alerts.yaml by `scripts/check-prometheus.sh --update`: edit alerts.yaml, not
# this file. The same rules as a PrometheusRule for the Prometheus Operator; the Prometheus
# resource's ruleSelector must match its labels.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: outbox-relay
  labels:
    app.kubernetes.io/name: outbox-relay
spec:
HEADER
  sed -n -e '/^groups:/,$p' "$ALERTS" | sed -e 's/^\(.\)/  \1/'
}

if [ "${1:-}" = --update ]; then
  render_prometheusrule >"$OPERATOR"
  echo "wrote $OPERATOR"
  exit 0
fi

install_promtool() {
  echo "promtool not found: installing Debian's prometheus package"
  local start=$SECONDS
  # The package's maintainer scripts would start a prometheus service on :9090. Forbid service
  # starts for the install (policy-rc.d, honoured by invoke-rc.d and deb-systemd-invoke) unless
  # the machine already forbids them, then stop and disable anything that started anyway.
  local policy=/usr/sbin/policy-rc.d made_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    made_policy=1
  fi
  local status=0
  {
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus ||
      { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; }
  } || status=$?
  [ -n "$made_policy" ] && rm -f "$policy"
  [ "$status" = 0 ] || { echo "installing prometheus failed" >&2; exit "$status"; }
  if [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  else
    service prometheus stop >/dev/null 2>&1 || true
    update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
  echo "installed prometheus in $((SECONDS - start)) s"
}

command -v promtool >/dev/null || install_promtool
promtool --version 2>&1 | head -n 1

start=$SECONDS
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

echo "--- promtool check rules $ALERTS"
promtool check rules "$ALERTS"

echo "--- promtool test rules $TESTS"
promtool test rules "$TESTS"

echo "--- $OPERATOR matches $ALERTS"
render_prometheusrule >"$TMP/prometheusrule.yaml"
if ! diff -u "$OPERATOR" "$TMP/prometheusrule.yaml"; then
  echo "$OPERATOR differs from what alerts.yaml renders: run scripts/check-prometheus.sh --update" >&2
  exit 1
fi
# Its spec, unindented, is a rule file too.
sed -n '/^spec:$/,$p' "$OPERATOR" | tail -n +2 | sed -e 's/^  //' >"$TMP/spec.yaml"
promtool check rules "$TMP/spec.yaml" >/dev/null

echo "--- $DASHBOARD and the queries of $QUERIES"
# Every query as a recording rule: promtool parses each (dashboard queries with Grafana's
# variables substituted), and the queries script fails on a metric the relay does not export.
python3 "$QUERIES" --rule-file "$TMP/queries.yaml" --require-all-metrics >"$TMP/queries.jsonl"
promtool check rules "$TMP/queries.yaml"
# The script must find as many alerts as promtool counts rules in alerts.yaml.
alerts=$(grep -c '"kind": "alert"' "$TMP/queries.jsonl" || true)
rules=$(promtool check rules "$ALERTS" | sed -n 's/.*SUCCESS: \([0-9]*\) rules found.*/\1/p')
if [ "$alerts" != "$rules" ]; then
  echo "$QUERIES found $alerts alerts; promtool found $rules rules in $ALERTS" >&2
  exit 1
fi
panels=$(grep -c '"kind": "panel"' "$TMP/queries.jsonl" || true)
echo "$alerts alerts and $panels dashboard queries are valid PromQL"

echo "check-prometheus: passed in $((SECONDS - start)) s"
