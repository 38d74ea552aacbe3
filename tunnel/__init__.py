"""Ingress tunnel service (installed as gateway.tunnel; the folder is tunnel/)."""
