"""The MySQL listener's shared state: target, pools, secrets, TLS contexts, RSA key and the KILL registry."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from cryptography.hazmat.primitives.asymmetric import rsa

from proxy import channel
from proxy.auth.guard import LoginGuard
from proxy.auth.mysql import generate_rsa_keypair, load_private_key, public_key_pem
from proxy.auth.networks import allow_list
from proxy.auth.tokens import TokenVerifier
from proxy.config import Config, MySQLAuthMethod, MySQLSettings, ServerSettings
from proxy.console import Console
from proxy.endpoints import Endpoint
from proxy.errors import (
    BackendUnavailable,
    BackendUnreachable,
    ConfigError,
    ConnectionKilled,
    KillDenied,
    NoSuchThread,
    ProxyError,
)
from proxy.netio import ConnectionClosed
from proxy.parameter_groups import groups_changed
from proxy.pool.balance import TargetGroup, target_group
from proxy.pool.mysql_backend import (
    RELAYED_CAPABILITIES,
    MySQLBackend,
    MySQLServerError,
    Profile,
    open_backend,
    probe_server,
)
from proxy.pool.pool import Backend, Pool, Target
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import HandshakeV10, frame
from proxy.rundir import run_dir, worker_channel, worker_count, worker_index
from proxy.secrets import SecretStore
from proxy.session.mysql_ids import fleet_proxy_of, is_proxy_id, next_proxy_id, worker_of
from proxy.stats import StatsRegistry
from proxy.tls import backend_context

if TYPE_CHECKING:
    from proxy.fleet.node import Fleet
    from proxy.session.causal import CausalReads

log = logging.getLogger(__name__)

# The proxy's own announcement: what its codecs can relay (DEFAULT_SERVER_CAPABILITIES) plus the MariaDB
# extensions the forwarder understands, always cut down to what the backend offers.
ANNOUNCED_CAPABILITIES = my.DEFAULT_SERVER_CAPABILITIES | (RELAYED_CAPABILITIES & ~0xFFFFFFFF)
# The greeting a client gets while the backend cannot be reached (an ERR with the reason follows its login).
STAND_IN_VERSION = "5.5.5-10.11.0-dbproxy"
# Session variables servers report that no client can set. On MariaDB the server's own list replaces this one
# (information_schema.SYSTEM_VARIABLES, READ_ONLY); on MySQL, which has no such table, variables a backend
# refuses as read-only (1238) are added as they are met.
READ_ONLY_VARIABLES = frozenset({b"last_gtid", b"in_transaction", b"gtid_executed", b"gtid_owned",
                                 b"external_user", b"proxy_user", b"warning_count", b"error_count"})
READ_ONLY_QUERY = ("SELECT LOWER(VARIABLE_NAME) FROM information_schema.SYSTEM_VARIABLES "
                   "WHERE READ_ONLY = 'YES' AND VARIABLE_SCOPE <> 'GLOBAL'")
COLLATIONS_QUERY = "SELECT ID FROM information_schema.COLLATIONS"


class Killer(Protocol):
    """Who asks for a KILL: a local client session, or one in another worker."""

    @property
    def user(self) -> str: ...

    @property
    def peer(self) -> str: ...


class KillTarget(Protocol):
    """A client whose running query a KILL QUERY ends."""

    kills_in_flight: int  # KILL QUERYs on their way to its backend (the backend stays with it meanwhile)

    def kill_settled(self) -> None: ...


class ServedClient(Killer, KillTarget, Protocol):
    """A client session of this service, as KILL and the connection-id table see it."""

    @property
    def closed(self) -> bool: ...

    @property
    def backend(self) -> MySQLBackend | None: ...

    @property
    def service(self) -> MySQLService: ...

    def fail(self, error: ProxyError) -> None: ...

    def parameter_group_changed(self) -> None: ...


@dataclass(frozen=True)
class RemoteKiller:
    user: str
    peer: str


def _raise_kill_answer(answer: channel.Message) -> None:
    """The KILL error another worker or proxy answered, raised here (nothing if it did the KILL)."""
    if answer.get("error") == "denied":
        raise KillDenied(str(answer.get("message")))
    if answer.get("error"):
        raise NoSuchThread(str(answer.get("message")))


class MySQLService:
    """Everything MySQL client sessions share inside one process."""

    draining = False  # the process is shutting down: no new transaction starts

    def __init__(self, config: Config, endpoint: Endpoint, secrets: SecretStore, server_tls: ssl.SSLContext | None,
                 stats: StatsRegistry, peer: MySQLService | None = None) -> None:
        self.config = config
        self.server: ServerSettings = config.server
        self.endpoint = endpoint
        self.settings = cast(MySQLSettings, endpoint.settings)
        self.secrets = secrets
        self.server_tls = server_tls
        self.backend_tls = backend_context(self.settings.backend_tls, self.settings.backend_ca_file)
        # A target per instance the endpoint may use; `target` is the configured instance's (the only one of a
        # read_write endpoint).
        self.group: TargetGroup = target_group("mysql", endpoint, stats)
        self.target: Target = self.group.home
        self.stats = stats.endpoint("mysql", endpoint.name, endpoint.cluster)
        # proxy connection id -> client (for KILL), one registry for every endpoint of the process
        self.clients: dict[int, ServedClient] = peer.clients if peer is not None else {}
        # see mysql_ids: the proxy's ids, apart from server thread ids
        self._connection_ids: itertools.count[int] = peer._connection_ids if peer is not None else itertools.count(1)
        # In a fleet the connection ids name this proxy (see mysql_ids); a KILL for another one is passed to it.
        self.fleet_proxy = config.fleet.proxy_id if config.fleet.enabled else None
        self.fleet: Fleet | None = None  # set by the server
        self.greeting: HandshakeV10 | None = None  # the backend's, learned by a probe or a login
        self._probe: asyncio.Task[HandshakeV10] | None = None
        self.session_tracking = False  # the backends report session state changes (CLIENT_SESSION_TRACK)
        self.exclude_variable_sets = "exclude_variable_sets" in self.settings.session_pinning_filters
        self.allowed = allow_list(self.settings.allowed_cidrs)  # who may connect (None: anyone)
        self.read_only_variables: set[bytes] = set(READ_ONLY_VARIABLES)  # reported, never re-applied
        self.collations: frozenset[int] = frozenset()  # collation ids the server knows (empty: not learned)
        self._learned_generation = -1  # the target generation whose server the two above come from
        self.target.on_repoint.append(self._forget_server)
        self.causal: CausalReads | None = None  # a read_only endpoint's causal-read step (set by the server)
        self.tokens: TokenVerifier | None = None  # the process's token verifier (set by the server)
        self.guard: LoginGuard | None = None  # the process's failed-login throttle and audit log (set by the server)
        self.console: Console | None = None  # the admin console, when the process has one (set by the server)
        self.rsa_key: rsa.RSAPrivateKey | None = None
        self.rsa_public_pem = b""
        if self.settings.auth_method is MySQLAuthMethod.CACHING_SHA2:
            self._load_rsa_key()

    def _load_rsa_key(self) -> None:
        path = self.settings.rsa_private_key_file
        if path is None:
            self.rsa_key, self.rsa_public_pem = generate_rsa_keypair()
            return
        try:
            self.rsa_key = load_private_key(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot load the RSA private key: {exc}") from None
        self.rsa_public_pem = public_key_pem(self.rsa_key)

    # --- the backend's greeting ---

    def start(self) -> None:
        """Learn the backend's version and capabilities in the background."""
        self._start_probe()

    def _forget_server(self) -> None:
        """The target was re-pointed: what was learned from the old server no longer holds."""
        self.greeting = None
        self._probe = None  # one under way reports the old server; it is ignored (see _probed)
        self.read_only_variables = set(READ_ONLY_VARIABLES)
        self.collations = frozenset()

    def _start_probe(self) -> asyncio.Task[HandshakeV10]:
        if self._probe is None or (self._probe.done() and self.greeting is None):
            target = self.target if self.group.single else self.group.choose() or self.target
            host, port, generation = target.host, target.port, target.generation
            self._probe = asyncio.get_running_loop().create_task(
                probe_server(host, port, self.settings.backend_connect_timeout))
            self._probe.add_done_callback(lambda task: self._probed(task, host, port, generation))
        return self._probe

    def _probed(self, task: asyncio.Task[HandshakeV10], host: str, port: int, generation: int) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.warning("MySQL backend %s:%d not reachable yet: %s", host, port, exc)
            return
        if self.greeting is None and generation == self.target.generation:
            self.greeting = task.result()
            log.info("MySQL backend %s:%d is %s", host, port, self.greeting.server_version)

    async def backend_greeting(self) -> HandshakeV10:
        if self.greeting is not None:
            return self.greeting
        return await asyncio.shield(self._start_probe())

    def stand_in_greeting(self) -> HandshakeV10:
        """A greeting of the proxy's own for a client while the backend cannot be reached."""
        return HandshakeV10(self.settings.server_version or STAND_IN_VERSION, 0, b"\0" * my.SCRAMBLE_LENGTH,
                            my.DEFAULT_SERVER_CAPABILITIES, my.UTF8MB4_GENERAL_CI, my.SERVER_STATUS_AUTOCOMMIT,
                            self.settings.auth_method.value)

    def unreachable_error(self, exc: ProxyError) -> ProxyError:
        """What a client hears after its login when the backend could not be reached: the server's own ERR
        (e.g. 1040, 1129), or 2003 with the address and the reason."""
        if isinstance(exc, MySQLServerError | BackendUnreachable):
            return exc
        return BackendUnreachable(f"Can't connect to the database at {self.target.host}:{self.target.port} "
                                  f"({exc.message})")

    def announced_capabilities(self, greeting: HandshakeV10) -> int:
        caps = ANNOUNCED_CAPABILITIES & greeting.capabilities
        if not self.settings.local_infile:
            caps &= ~my.CLIENT_LOCAL_FILES
        if self.server_tls is not None:
            caps |= my.CLIENT_SSL
        return caps

    # --- pools ---

    def pool_for(self, database: str, user: str, profile: Profile, target: Target | None = None) -> Pool:
        """The pool for (database, user, profile) on `target`, else on the instance the endpoint would choose now."""
        # The character set is not part of the key: a backend takes the character set of each client it serves
        # (see MySQLBackend.apply_state), so clients of every character set share the backends and wait in one line.
        if target is None:
            target = self.target if self.group.single else self.group.choose() or self.target
        key = (database, f"{user}\x00{profile.capabilities:x}")
        pool = target.pools.get(key)
        if pool is None:
            async def connect(pool: Pool) -> Backend:
                return await self._connect(pool, profile)

            naming = None if self.group.single else self.group.naming(key)
            pool = target.pools[key] = Pool(target, database, user, connect, naming)
        return pool

    async def _connect(self, pool: Pool, profile: Profile) -> Backend:
        backend, greeting = await open_backend(pool, profile, self.settings, self.secrets, self.backend_tls)
        if backend.generation != pool.target.generation:
            return backend  # opened to the server of before a repoint: the pool drops it and connects again
        self.greeting = greeting
        self.session_tracking = backend.tracks_session_state
        if self._learned_generation < backend.generation:
            try:
                await asyncio.wait_for(self._learn_server(backend), self.settings.backend_connect_timeout)
            except BaseException as exc:
                backend.forgotten = True  # never counted by the pool as open
                backend.abort()
                if isinstance(exc, TimeoutError | ConnectionClosed | OSError):
                    raise BackendUnavailable(f"the database did not answer: {exc or 'timeout'}") from None
                raise
        return backend

    async def _learn_server(self, backend: MySQLBackend) -> None:
        """Once per server (per target generation): the session variables the server reports that are read only,
        and its collations."""
        generation = backend.generation
        target = backend.pool.target
        try:
            rows = await backend.query(READ_ONLY_QUERY)
        except MySQLServerError as exc:  # MySQL: no such table; learned from refusals instead
            log.info("MySQL backend: read-only variables not listed (%s); using the built-in list", exc.message)
            rows = []
        if generation != target.generation:
            return  # re-pointed meanwhile
        self.read_only_variables.update(row[0] for row in rows if row[0])
        try:
            rows = await backend.query(COLLATIONS_QUERY)
        except MySQLServerError as exc:
            log.info("MySQL backend: collations not listed (%s)", exc.message)
        else:
            if generation != target.generation:
                return
            self.collations = frozenset(int(row[0]) for row in rows if row[0])
        self._learned_generation = generation

    def charset_command(self, collation: int) -> bytes:
        """COM_QUERY giving a session the character set a login with `collation` gets (the server's default for
        one it does not know, as at login)."""
        if collation and (not self.collations or collation in self.collations):
            return b"\x03SET character_set_client=%d, character_set_results=%d, collation_connection=%d" % (
                collation, collation, collation)
        return (b"\x03SET character_set_client=@@GLOBAL.character_set_client, character_set_results="
                b"@@GLOBAL.character_set_results, collation_connection=@@GLOBAL.collation_connection")

    @staticmethod
    def statement_key(schema: str, settings: bytes, sql: bytes) -> bytes:
        """What names a prepared statement on every backend: a digest of its text, the default database and the
        session settings it is prepared under. A backend's statement of the same key is the same statement."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(schema.encode("utf-8", "surrogateescape"))
        digest.update(b"\x00")
        digest.update(settings)
        digest.update(b"\x00")
        digest.update(sql)
        return digest.digest()

    def new_connection_id(self) -> int:
        return next_proxy_id(worker_index(), self._connection_ids, self.clients, self.fleet_proxy)

    # --- KILL ---

    async def kill(self, killer: Killer, connection_id: int, query_only: bool, forwarded: bool = False) -> None:
        """KILL [QUERY] id: a proxy connection id acts on what that client runs right now, and only that; another
        number is a server thread id (SHOW PROCESSLIST), acted on if it is one of the proxy's backend connections
        (in any worker). Anything else: 1094 Unknown thread id."""
        if not is_proxy_id(connection_id):
            await self._kill_thread(killer, connection_id, query_only, forwarded)
            return
        owner_proxy = fleet_proxy_of(connection_id)
        if self.fleet is not None and owner_proxy is not None and owner_proxy != self.fleet.proxy_id:
            await self._fleet_kill(owner_proxy, killer, connection_id, query_only)
            return
        owner = worker_of(connection_id)
        if owner != worker_index() and run_dir() is not None and not forwarded:
            await self._forward_kill(owner, killer, connection_id, query_only)
            return
        target = self.clients.get(connection_id)
        if target is None or target.closed:
            raise NoSuchThread(f"Unknown thread id: {connection_id}")
        if target.user != killer.user:
            raise KillDenied(f"You are not owner of thread {connection_id}")
        log.info("client %s: KILL %s%d", killer.peer, "QUERY " if query_only else "", connection_id)
        if not query_only:
            target.fail(ConnectionKilled("Connection was killed"))
            return
        backend = target.backend
        if backend is None or backend.tracker.done:
            log.info("KILL QUERY %d: that client runs nothing right now", connection_id)
            return
        await self._kill_clients_query(target, backend, target.service)  # (its endpoint may be another one)

    @staticmethod
    async def _kill_clients_query(target: KillTarget, backend: MySQLBackend, service: MySQLService) -> None:
        target.kills_in_flight += 1  # its backend stays with it until the kill has landed
        try:
            await service.kill_query(backend)
        finally:
            target.kills_in_flight -= 1
            target.kill_settled()

    def backend_by_thread(self, thread_id: int) -> MySQLBackend | None:
        """This worker's backend connection with that server thread id (pooled: idle or lent to a client)."""
        for pool in [pool for target in self.group.all() for pool in target.pools.values()]:
            for backend in itertools.chain(pool.busy, pool.idle):
                if isinstance(backend, MySQLBackend) and backend.thread_id == thread_id and not backend.closed:
                    return backend
        return None

    async def _kill_thread(self, killer: Killer, thread_id: int, query_only: bool, forwarded: bool) -> None:
        """KILL [QUERY] with a server thread id: that backend connection's query (or session: the client it serves
        is closed and the connection dropped), if this proxy owns it; never another client."""
        backend = self.backend_by_thread(thread_id)
        if backend is None:
            if not forwarded and run_dir() is not None:
                for owner in range(worker_count()):
                    if owner != worker_index():
                        try:
                            await self._forward_kill(owner, killer, thread_id, query_only)
                        except NoSuchThread:
                            continue
                        return
            raise NoSuchThread(f"Unknown thread id: {thread_id}")
        if backend.pool.user != killer.user:
            raise KillDenied(f"You are not owner of thread {thread_id}")
        target = backend.client
        log.info("client %s: KILL %s%d (a backend thread, serving %s)", killer.peer, "QUERY " if query_only else "",
                 thread_id, target.peer if target is not None else "no client")
        if not query_only:
            if target is not None:
                target.fail(ConnectionKilled("Connection was killed"))  # drops the backend if a query runs
            if not backend.closed and backend.client is None:
                backend.pool.discard(backend)
            return
        if backend.tracker.done and not backend.queue:
            log.info("KILL QUERY %d: that backend thread runs nothing right now", thread_id)
            return
        if target is not None:
            await self._kill_clients_query(target, backend, self)
        else:
            await self.kill_query(backend)

    async def _forward_kill(self, owner: int, killer: Killer, connection_id: int, query_only: bool) -> None:
        """The client (or backend thread) may live in another worker process: ask that worker, report its answer."""
        message = {"kind": "kill", "endpoint": self.endpoint.name, "user": killer.user, "peer": killer.peer,
                   "id": connection_id, "query_only": query_only}
        try:
            answer = await channel.ask(worker_channel(owner), message, self.settings.backend_connect_timeout)
        except channel.ChannelError as exc:
            log.warning("KILL %d: worker %d did not answer: %s", connection_id, owner, exc)
            raise NoSuchThread(f"Unknown thread id: {connection_id}") from None
        _raise_kill_answer(answer)
        log.info("KILL %s%d passed to worker %d", "QUERY " if query_only else "", connection_id, owner)

    async def _fleet_kill(self, owner: int, killer: Killer, connection_id: int, query_only: bool) -> None:
        """The client is another proxy's of the fleet: pass the KILL to it, report its answer (1094 if none)."""
        assert self.fleet is not None
        message = {"kind": "kill", "endpoint": self.endpoint.name, "user": killer.user, "peer": killer.peer,
                   "id": connection_id, "query_only": query_only}
        answer = await self.fleet.forward(owner, message, f"KILL {'QUERY ' if query_only else ''}{connection_id}")
        if answer is None:
            self.stats.fleet_forwards_dropped += 1
            raise NoSuchThread(f"Unknown thread id: {connection_id}")
        self.stats.fleet_forwards += 1
        _raise_kill_answer(answer)

    async def serve_kill(self, message: channel.Message, forwarded: bool = True) -> channel.Message:
        """The other side of `_forward_kill`: a KILL asked on another worker, for what this one may own
        (forwarded: False, a peer proxy's forward for a client of any worker here)."""
        try:
            killer = RemoteKiller(str(message["user"]), str(message["peer"]))
            connection_id = int(message["id"])
            if not forwarded and fleet_proxy_of(connection_id) != self.fleet_proxy:  # (never passed on again)
                log.warning("fleet: KILL %d is not for a client of this proxy; refused", connection_id)
                return {"error": "unknown", "message": f"Unknown thread id: {connection_id}"}
            await self.kill(killer, connection_id, bool(message["query_only"]), forwarded=forwarded)
        except KillDenied as exc:
            return {"error": "denied", "message": exc.message}
        except ProxyError as exc:
            return {"error": "unknown", "message": exc.message}
        except (KeyError, TypeError, ValueError):
            return {"error": "unknown", "message": "malformed KILL request"}
        return {}

    async def kill_query(self, backend: MySQLBackend) -> None:
        """KILL QUERY the backend thread's statement, from a separate connection the pool never counts."""
        pool = backend.pool
        try:  # to the server that backend was opened to, even if the target was re-pointed since
            conn, _ = await open_backend(pool, backend.profile, self.settings, self.secrets, self.backend_tls,
                                         database="", pooled=False, address=(backend.host, backend.port))
        except ProxyError as exc:
            log.warning("KILL QUERY for backend thread %d: cannot connect: %s", backend.thread_id, exc.message)
            return
        try:
            await asyncio.wait_for(conn.query(f"KILL QUERY {backend.thread_id}"), self.settings.backend_connect_timeout)
            log.info("KILL QUERY sent for backend thread %d", backend.thread_id)
        except (ProxyError, ConnectionClosed, TimeoutError) as exc:
            log.warning("KILL QUERY for backend thread %d failed: %s", backend.thread_id, exc)
        finally:
            conn.write(frame(bytes((my.COM_QUIT,))))
            conn.close()

    # --- maintenance ---

    def maintain(self, now: float) -> None:
        for target in self.group.all():
            for pool in list(target.pools.values()):
                pool.maintain(now)
            target.forget_unused_pools(now)

    def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        for target in self.group.all():
            for pool in target.pools.values():
                pool.close_all()

    def reconfigure(self, endpoint: Endpoint) -> None:
        """New settings for the endpoint (a reload): new logins and backend connects use them."""
        old = self.settings
        self.endpoint = endpoint
        self.settings = cast(MySQLSettings, endpoint.settings)
        if (old.backend_tls, old.backend_ca_file) != (self.settings.backend_tls, self.settings.backend_ca_file):
            self.backend_tls = backend_context(self.settings.backend_tls, self.settings.backend_ca_file)
        self.exclude_variable_sets = "exclude_variable_sets" in self.settings.session_pinning_filters
        self.allowed = allow_list(self.settings.allowed_cidrs)
        if self.settings.auth_method is MySQLAuthMethod.CACHING_SHA2 and (
                self.rsa_key is None or old.rsa_private_key_file != self.settings.rsa_private_key_file):
            self._load_rsa_key()
        if groups_changed(old, self.settings):  # clients take the new values at their next borrow
            for client in list(self.clients.values()):
                if client.service is self:
                    client.parameter_group_changed()
            log.info("reload: endpoint %s: parameter groups changed", self.endpoint.name)
