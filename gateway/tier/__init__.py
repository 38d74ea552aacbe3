"""The inspection tier: a supervised mitmproxy process on loopback (`proxy`, run by `supervisor`), its CA (`ca`) and its
`[inspection]` section (`config`, the tier's public face)."""
