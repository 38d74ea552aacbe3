"""Sandbox network gateway: policy core, egress data plane, DNS interception and ingress tunnels."""

__version__ = "0.1.0"
