#!/usr/bin/env bash
# Install the real peers the tests talk to (Debian packages). As root with apt-get this
# installs what is missing; otherwise it says exactly what to install and carries on:
# the peer tests then fail under ECPM_REQUIRE_PEERS=1 (CI) or are skipped loudly.
set -euo pipefail
# program:package
peers="mosquitto:mosquitto mosquitto_sub:mosquitto-clients sipp:sip-tester promtool:prometheus chromium:chromium"
# Alertmanager: Debian names the server binary prometheus-alertmanager (upstream: alertmanager)
peers="$peers amtool:prometheus-alertmanager prometheus-alertmanager:prometheus-alertmanager"
missing=()
for pair in $peers; do
  prog=${pair%%:*} pkg=${pair#*:}
  PATH="$PATH:/usr/sbin:/sbin" command -v "$prog" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && { echo "peers: all present"; exit 0; }
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "peers: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts mosquitto as a service on 1883; tests run their own brokers on free ports.
else
  echo "peers: MISSING ${missing[*]} — install them with: sudo apt-get install ${missing[*]}" >&2
fi
