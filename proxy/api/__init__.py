"""The HTTP control API (aiohttp): read what the proxy serves, act on it, and its health endpoints."""
