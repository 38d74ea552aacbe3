# The gateway image: `docker compose up` (compose.yaml) builds it. Run-time apt packages are the ones
# scripts/setup installs for running (a test keeps the two lists equal).
FROM python:3.12-slim

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       nftables iproute2 procps openssl ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY dns ./dns
COPY tunnel ./tunnel
COPY addons ./addons
RUN pip install --no-cache-dir . && rm -rf /src

COPY deploy/entrypoint.sh /usr/local/bin/gateway-entrypoint
WORKDIR /var/lib/gateway
ENTRYPOINT ["/usr/local/bin/gateway-entrypoint"]
CMD ["run", "--data-plane", "--steer", "--config", "/etc/gateway/gateway.toml"]
