#!/bin/sh
# The image's entrypoint: refuse to start, with a message saying what is missing, when the configuration
# or the tunnel's certificates are not where the compose file mounts them; then `exec gateway "$@"`
# (by default `run --data-plane --steer --config /etc/gateway/gateway.toml`): the gateway replaces this shell
# as PID 1, so `docker stop`'s SIGTERM reaches it directly.
set -eu

config=""
previous=""
for arg in "$@"; do
  [ "$previous" = "--config" ] && config="$arg"
  previous="$arg"
done
config="${config:-${GATEWAY_CONFIG:-}}"

if [ -z "$config" ]; then
  echo "entrypoint: ENTRYPOINT_NO_CONFIG: no configuration given (--config FILE or GATEWAY_CONFIG)" >&2
  exit 2
fi
if [ ! -r "$config" ]; then
  echo "entrypoint: ENTRYPOINT_NO_CONFIG: configuration $config is missing or unreadable (mount it, see README 'Deploying')" >&2
  exit 2
fi
# check-config loads the tunnel certificates when the tunnel is enabled (CERT_INVALID names the file), so
# a missing `gateway certs init` step is reported here, before anything is started.
if ! gateway check-config --config "$config" >/dev/null; then
  echo "entrypoint: ENTRYPOINT_CONFIG_INVALID: $config does not pass 'gateway check-config' (message above)" >&2
  exit 2
fi
exec gateway "$@"
