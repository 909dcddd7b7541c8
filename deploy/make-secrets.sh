#!/usr/bin/env sh
# Write the compose stack's secrets to deploy/.env (or the file given), mode 0600:
# the probes' result-signing keys, MQTT passwords, tokens, the Grafana admin password.
# An existing file is kept: delete it to rotate everything (then restart the stack).
# Also creates deploy/alertmanager/secrets/ for your PagerDuty key and Slack URL.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/.env}
if [ -e "$out" ]; then
  echo "$out exists; keeping it (delete it to make new secrets)" >&2
else
  umask 077
  rnd() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }
  {
    echo "# ecpm compose secrets, made by deploy/make-secrets.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    for name in ECPM_PROBE_A_KEY ECPM_PROBE_B_KEY ECPM_MONITOR_MQTT_PASSWORD \
                ECPM_PROBE_A_MQTT_PASSWORD ECPM_PROBE_B_MQTT_PASSWORD \
                ECPM_MONITOR_TOKEN ECPM_RESPONDER_TOKEN GRAFANA_ADMIN_PASSWORD; do
      echo "$name=$(rnd)"
    done
  } >"$out"
  echo "wrote $out"
fi
if [ -z "${1:-}" ]; then
  secrets=$here/alertmanager/secrets
  mkdir -p "$secrets"
  for f in pagerduty-routing-key slack-webhook-url; do
    [ -e "$secrets/$f" ] || { : >"$secrets/$f"; echo "put your ${f%%-*} secret in $secrets/$f"; }
  done
fi
