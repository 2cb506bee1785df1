"""What a forwarded MySQL command does to its session, carried with it until its response completes: (kind, value)."""

# The kinds of effect: a new default database, a client's prepare (its response relabelled), a reset, a
# multi-statements option, a query or execution with session effects, a cursor fetch or statement reset, and the
# proxy's own command (its response swallowed).
SCHEMA, PREPARE, RESET, SET_OPTION, QUERY, EXECUTE, FETCH, STMT_RESET, INTERNAL = range(9)
