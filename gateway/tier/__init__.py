"""The inspection tier: a supervised mitmdump process on loopback (`supervisor`), its CA (`ca`) and its
`[inspection]` section (`config`, the tier's public face)."""
