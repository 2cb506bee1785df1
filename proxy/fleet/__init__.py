"""Several proxies behind one address: cancels and KILLs passed to the proxy that owns the client."""
