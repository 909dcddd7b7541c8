#!/usr/bin/env bash
# Install the real peers the tests talk to (Debian packages). As root with apt-get this
# installs what is missing; otherwise it says exactly what to install and carries on:
# the peer tests then fail under ECPM_REQUIRE_PEERS=1 (CI) or are skipped loudly.
set -euo pipefail
# program:package
peers="mosquitto:mosquitto mosquitto_sub:mosquitto-clients sipp:sip-tester promtool:prometheus chromium:chromium"
# Alertmanager: Debian names the server binary prometheus-alertmanager (upstream: alertmanager)
peers="$peers amtool:prometheus-alertmanager prometheus-alertmanager:prometheus-alertmanager"
# PostgreSQL (the store tests): Debian keeps initdb and pg_ctl in /usr/lib/postgresql/<version>/bin
peers="$peers initdb:postgresql pg_ctl:postgresql"
# Kamailio (the registrar/proxy of the register tests): the daemon is in /usr/sbin
peers="$peers kamailio:kamailio"
pg_bin=$(printf '%s:' /usr/lib/postgresql/*/bin)
missing=()
for pair in $peers; do
  prog=${pair%%:*} pkg=${pair#*:}
  PATH="$PATH:/usr/sbin:/sbin:$pg_bin" command -v "$prog" >/dev/null 2>&1 || missing+=("$pkg")
done
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u | sed '/^$/d')
[ ${#missing[@]} -eq 0 ] && { echo "peers: all present"; exit 0; }
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "peers: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts mosquitto as a service on 1883, postgresql a cluster on 5432 and kamailio
  # on 5060; the tests run their own brokers, cluster and kamailio on free loopback ports.
else
  echo "peers: MISSING ${missing[*]} — install them with: sudo apt-get install ${missing[*]}" >&2
fi
