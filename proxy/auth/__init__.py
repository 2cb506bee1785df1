"""Authentication: pure functions and small exchange objects, shared by both sides of the proxy."""
