"""The replies to one PostgreSQL simple Query, collected as they pass: kept only if complete and plain."""

from __future__ import annotations

ROW_DESCRIPTION, DATA_ROW, COMMAND_COMPLETE, READY_FOR_QUERY = b"TDCZ"
IDLE = ord("I")


class PgReplyCapture:
    """Walks the bytes given to the client after a Query: RowDescription, DataRows, CommandComplete, then an idle
    ReadyForQuery. Anything else (an error, a notice, a parameter change, COPY, several results), more than
    `limit` bytes, or a transaction left open, and nothing is kept."""

    __slots__ = ("_buffer", "_expect", "_pos", "_prefix", "limit", "result")

    def __init__(self, limit: int, prefix: bytes = b"", described: bool = True) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._pos = 0
        self._prefix = prefix  # replies expected first, in order (an extended-query batch: ParseComplete, BindComplete)
        self._expect = ROW_DESCRIPTION if described else DATA_ROW  # then T (if described), D or C, then Z
        self.result: bytes | None = None  # the replies without their ReadyForQuery, once complete

    def feed(self, data: bytes) -> bool:
        """More bytes for the client; True once the capture is over (see `result`)."""
        buffer = self._buffer
        buffer += data
        pos = self._pos
        end = len(buffer)
        while end - pos >= 6:
            kind = buffer[pos]
            if self._prefix:
                if kind != self._prefix[0]:
                    return self._give_up()
                self._prefix = self._prefix[1:]
            elif kind == READY_FOR_QUERY:
                if self._expect != READY_FOR_QUERY or buffer[pos + 5] != IDLE:
                    return self._give_up()
                self.result = bytes(buffer[:pos])
                self._buffer = bytearray()
                return True
            elif kind == ROW_DESCRIPTION and self._expect == ROW_DESCRIPTION:
                self._expect = DATA_ROW
            elif kind == COMMAND_COMPLETE and self._expect == DATA_ROW:
                self._expect = READY_FOR_QUERY
            elif kind != DATA_ROW or self._expect != DATA_ROW:
                return self._give_up()
            pos += 1 + int.from_bytes(buffer[pos + 1 : pos + 5], "big")
        self._pos = pos
        if end > self.limit:
            return self._give_up()
        return False

    def _give_up(self) -> bool:
        self._buffer = bytearray()
        self.result = None
        return True
