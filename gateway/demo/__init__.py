"""`gateway demo`: the product working on throw-away namespaces (a fake internet, the gateway, a sandbox)."""
