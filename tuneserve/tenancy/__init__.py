"""Tenants, their API keys, and authenticating the gateway's requests."""
