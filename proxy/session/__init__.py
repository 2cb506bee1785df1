"""Client sessions: one driver per protocol, from login to forwarding."""
