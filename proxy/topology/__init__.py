"""Cluster topology: which instance is the writer, which are readers, how far behind they are, and whether they live."""
