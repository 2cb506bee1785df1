"""The fields of a PostgreSQL client session: its engine-neutral SessionState, its backend, its forwarding state."""

from __future__ import annotations

import asyncio

from proxy.pool.pg_backend import PostgresBackend
from proxy.pool.pool import Pool
from proxy.session.client import ClientConnection, State
from proxy.session.pg_replay_rules import Loss
from proxy.session.pg_service import PostgresService
from proxy.session.pg_statements import ClientStatement, Statements
from proxy.session.replay_log import ReplayCheck, ReplayLog
from proxy.session.state import SessionState

PgSessionState = SessionState[str, ClientStatement]  # settings as the server's text; named statements by name


class PgSession(ClientConnection):
    """One client connection's fields; the layers above (settings, borrowing, forwarding, login) work on them.

    Its session as the client sees it, whichever backend serves it, is `session`: user, database, the settings it
    wants on any backend (numbered by the pool), its pin reasons, its named statements. A backend is given it in
    one call (`PostgresBackend.apply_state`)."""

    def __init__(self, service: PostgresService) -> None:
        super().__init__(service.server.max_message_size)
        self.service = service
        self.server = service.server
        self.stats = service.stats
        self.allowed = service.allowed
        self.guard = service.guard
        self.state = State.LOGIN
        self.session: PgSessionState = SessionState()
        self.pool: Pool | None = None
        self.process_id = 0
        self.secret_key = 0
        self.backend: PostgresBackend | None = None
        self.pending = 0  # Query/Sync/FunctionCall messages sent whose ReadyForQuery has not come back
        self.in_extended = False  # extended-query messages sent since the last Sync
        self.statements: Statements  # named and unnamed prepared statements (pg_statements; made by PgSettings)
        self._checking = False  # a statement check is out: the client's bytes wait in _held for its reply
        self._state_dirty = False  # a statement may have changed settings or pinned state
        self._seq_hold = False  # this transaction may have set a sequence value it did not return
        self._seq_holding: asyncio.TimerHandle | None = None  # keeping the backend for lastval()/currval()
        self._seq_hold_over = False  # the hold's time is up: the backend goes back at the transaction's end
        self._seq_hold_since = 0.0
        self._reserved: PostgresBackend | None = None  # held for this client between its transactions
        self.seq_backend: PostgresBackend | None = None  # the backend of this client's latest transaction
        self.seq_use = 0  # its use count then (see pg_sequences)
        self._seq_words: set[bytes] = set()  # sequence-related words of the transaction being started
        self.active = True  # data seen since the janitor last looked
        self.idle_since = 0.0
        self._held = bytearray()  # client bytes waiting for a backend
        self._acquiring: asyncio.Task[None] | None = None
        self._queued = False  # waiting in the pool's line for a backend
        self.waiting_since = 0.0
        self._borrowing = False
        self._skip = 0  # bytes of the current message still to pass before the next header
        self._partial = b""  # an incomplete header (under 5 bytes) carried to the next read
        self._message: bytearray | None = None  # an inspected message arriving in parts, gathered
        self._message_size = 0  # its full size
        self._scanning = False  # the bytes being skipped are a streamed Query's text, scanned for session words
        self._scan_tail = b""  # the end of the previous part of that text
        self._yielding = False  # reading paused until the event loop's next turn
        self._dropping = 0  # bytes still to come of a stray COPY message dropped without a backend
        # Replay of the current transaction after a lost backend (see pg_replay).
        self.replay_log: ReplayLog | None = None  # its messages and a digest of its replies (None: not recorded)
        self._answered = 0  # ReadyForQuery messages given to the client in the current transaction
        self._replaying = False  # a replay's replies are being compared; the client's next messages wait
        self._replay_check: ReplayCheck | None = None
        self._replays = 0  # replays of the current transaction
        self._replay_loss: Loss | None = None  # what the loss that started the replay left
        self._replay_size = 0  # bytes of the replayed messages
        self._replay_extra = bytearray()  # what the client sent during the replay
        self._aborted = False  # the client's transaction block failed: its requests are answered by the proxy
        self._to_sync = 0  # a failed extended-query batch: skip to its Sync, then ReadyForQuery with this status
        self._owed_error = b""  # an error the client is given at its next request (it waited for nothing)
        self._ending = False  # an extended-query ROLLBACK (or COMMIT) of a failed block is being answered

    @property
    def recovers(self) -> bool:
        """A lost backend is recovered from (see pg_replay): the server's FATAL 57P01/57P02 is not for the client."""
        return self.replay_log is not None

    def deliver(self, out: bytes) -> None:
        """Replies of the linked backend for the client (PgReplay notes them for a replay)."""
        self.transport.write(out)

    def _mid_message_on_backend(self) -> bool:
        """Part of a message has reached the linked backend (or is held for it) and the rest has not come."""
        return bool(self._skip or self._partial or self._message is not None)

    def _terminate(self) -> None:
        self.state = State.CLOSED
        self.close()
