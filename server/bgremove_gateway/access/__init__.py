"""Who may call: the access-control interceptor, API keys, per-key limits, TLS, the access log."""
