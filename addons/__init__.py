"""mitmproxy addons for the opt-in inspection tier (installed as gateway.addons)."""
