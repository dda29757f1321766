"""The remove.bg-compatible HTTP API: POST /v1.0/removebg on the gateway's Pipeline (docs/http-api.md)."""
