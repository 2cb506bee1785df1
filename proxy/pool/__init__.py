"""Backend connections and the pools that lend them to client sessions."""
