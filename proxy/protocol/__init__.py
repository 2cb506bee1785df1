"""Sans-IO wire protocol codecs."""
