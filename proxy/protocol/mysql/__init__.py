"""Sans-IO MySQL/MariaDB client/server protocol: constants, framing, packet codecs, response tracking."""
