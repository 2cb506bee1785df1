"""dbproxy: a pooling, multiplexing proxy for PostgreSQL and MySQL/MariaDB."""

from proxy import compiled as _compiled

__version__ = "0.1.0"

_compiled.choose()
