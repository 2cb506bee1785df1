"""PostgreSQL v3 wire protocol: sans-IO message builders, parsers and framing."""
