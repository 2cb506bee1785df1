"""Configuration schema and loader: one TOML file, validated at start, unknown keys refused."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from proxy.errors import ConfigError

PERCENT = re.compile(r"^\s*(\d{1,3})\s*%\s*$")


def _check_cidr(value: str) -> str:
    """An IPv4 or IPv6 network ("10.0.0.0/8", "2001:db8::/32"; a bare address is one host), in its normal form."""
    try:
        return str(ipaddress.ip_network(value.strip(), strict=True))
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 network ({exc})") from None


CIDR = Annotated[str, AfterValidator(_check_cidr)]
ALLOWED_CIDRS_HELP = ("client addresses (networks such as '10.0.0.0/8' or '2001:db8::/32') that may connect, like a "
                      "security group; absent: every address, an empty list: none (unix sockets always may)")


class Strict(BaseModel):
    """Base for every section: unknown keys are an error, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)


class PoolMode(StrEnum):
    TRANSACTION = "transaction"
    SESSION = "session"


class ClientAuthMethod(StrEnum):
    SCRAM_SHA_256 = "scram-sha-256"
    MD5 = "md5"
    PASSWORD = "password"  # cleartext, accepted only over TLS


class BackendTLSMode(StrEnum):
    DISABLE = "disable"
    PREFER = "prefer"
    REQUIRE = "require"
    VERIFY_FULL = "verify-full"


class ClientTLSMode(StrEnum):
    DISABLE = "disable"  # SSLRequest answered 'N'
    ALLOW = "allow"  # TLS offered, plaintext accepted
    REQUIRE = "require"  # plaintext logins refused


class TokenAuthMode(StrEnum):
    DISABLED = "disabled"  # passwords only
    REQUIRED = "required"  # a signed token sent as the password, over TLS
    OPTIONAL = "optional"  # over TLS a token or the password; without TLS the password (SCRAM/MD5/native)


class ServerSettings(Strict):
    """Process-wide settings: where to listen and how long to wait for clients."""

    host: str = "127.0.0.1"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: str = Field("text", pattern="^(text|json)$")
    client_login_timeout: float = Field(15.0, gt=0, description="seconds a client has to finish its login")
    idle_client_timeout: float = Field(1800.0, gt=0, description="RDS Proxy IdleClientTimeout, seconds")
    client_message_timeout: float = Field(
        10.0, gt=0, description="seconds a client may stop in the middle of a message before it is disconnected"
    )
    max_client_connections: int = Field(100_000, gt=0)
    max_message_size: int = Field(
        1 << 30, gt=1024, description="largest single protocol message accepted from a client, bytes"
    )
    shutdown_grace: float = Field(10.0, ge=0)
    workers: int = Field(0, ge=0, le=64, description="worker processes sharing the ports; 0 means one per core")
    metrics_port: int = Field(-1, ge=-1, le=65535, description="Prometheus endpoint port; -1 off, 0 a free port")
    statement_insights: int = Field(
        5000, ge=0, le=1_000_000,
        description="statement statistics: distinct statements kept per process (least recent evicted); 0 off")
    pid_file: Path | None = Field(None, description="where the running process writes its pid for `dbproxy "
                                  "reload`; empty means a file in the temporary folder named after the config file")

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


# [server] keys a running process cannot take: a reload keeps the running value and says so.
RESTART_KEYS = ("host", "workers", "metrics_port", "log_format", "pid_file")


class ApiSettings(Strict):
    """The HTTP control API (bearer token) and the health endpoints, served by the supervisor (or the single
    process). Changes take a restart."""

    host: str = "127.0.0.1"
    port: int = Field(-1, ge=-1, le=65535, description="control API port (/v1, bearer token); -1 off, 0 a free port")
    token: SecretStr | None = Field(None, description="the bearer token the API asks for (or token_file)")
    token_file: Path | None = Field(None, description="a file holding the bearer token (read at start)")
    health_port: int = Field(-1, ge=-1, le=65535, description="/healthz, /readyz and /metrics without auth; -1 off, "
                             "0 a free port")

    @model_validator(mode="after")
    def _token_given(self) -> ApiSettings:
        if self.token is not None and self.token_file is not None:
            raise ValueError("give token or token_file, not both")
        if self.port >= 0 and self.token is None and self.token_file is None:
            raise ValueError("port is set: give token or token_file (the API asks every request for it)")
        if self.token is not None and not self.token.get_secret_value().strip():
            raise ValueError("token is empty")
        return self


class TLSSettings(Strict):
    """Client-facing TLS: certificate and key; both empty means a self-signed pair made at start."""

    mode: ClientTLSMode = ClientTLSMode.ALLOW
    cert_file: Path | None = None
    key_file: Path | None = None


class SecretsSettings(Strict):
    """Where database user passwords come from: the environment over a folder (a mounted Kubernetes Secret: a file
    per user) over an encrypted file or a TOML file of `user = "password"`; watched for changes."""

    file: Path | None = Field(None, description="TOML file of user = \"password\" lines (under [users])")
    dir: Path | None = Field(None, description="folder with one file per user holding its password (a mounted "
                             "Kubernetes Secret); hidden entries are skipped")
    encrypted_file: Path | None = Field(None, description="JSON file sealed by `dbproxy secrets put` "
                                        "(envelope encryption, AES-256-GCM)")
    master_key_file: Path | None = Field(None, description="the encrypted file's master key (`dbproxy secrets "
                                         "master-key`); else DBPROXY_MASTER_KEY (base64) in the environment")
    env_prefix: str = "DBPROXY_PASSWORD_"
    watch_interval: float = Field(2.0, ge=0, description="seconds between checks of the files for changes "
                                  "(new passwords used without a restart); 0: only at a reload")
    rotation_user: str = Field("", description="the database user (its password in the secrets) that "
                               "`dbproxy secrets rotate` sets new passwords with")
    alternating: dict[str, str] = Field(
        default_factory=dict, description="user -> its clone: two database users the backend logins of the "
        "user's clients alternate between, a rotation changing the one not in use")

    def __repr__(self) -> str:
        return (f"SecretsSettings(file={self.file!r}, dir={self.dir!r}, encrypted_file={self.encrypted_file!r}, "
                f"watch_interval={self.watch_interval!r})")

    __str__ = __repr__


class RedisClientSettings(Strict):
    """How a section reaches its Redis (or ElastiCache): URL (rediss:// for TLS), ACL user, AUTH token, CA bundle,
    and how long a call may take."""

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="redis:// or rediss:// (TLS)")
    redis_username: str | None = None
    redis_password: SecretStr | None = None
    redis_ca_file: Path | None = None
    redis_timeout: float = Field(0.5, gt=0, description="seconds a Redis call may take")


class AuthSettings(RedisClientSettings):
    """Login protection for every endpoint: the failed-login throttle per source address (in this process or
    shared in Redis), and the audit file."""

    failed_login_limit: int = Field(
        20, ge=0, description="failed logins from one address within failed_login_window that lock it out; 0: off")
    failed_login_window: float = Field(60.0, gt=0, description="seconds over which failed logins are counted")
    failed_login_lockout: float = Field(
        60.0, gt=0, description="seconds a locked-out address has its logins refused before any password check")
    audit_file: Path | None = Field(
        None, description="file to append one JSON line per login outcome to (reopened at a reload); empty: none")
    failed_login_scope: Literal["address", "user"] = Field(
        "address", description="address: the failed logins of every user from an address count together; user: "
        "per user and address (a wrong password of one user does not lock out the others behind a shared address)")
    throttle_store: Literal["local", "redis"] = Field(
        "local", description="local: counts per worker process; redis: shared by every worker and proxy using the "
        "same Redis (redis_* settings)")
    redis_key_prefix: str = "dbproxy:auth:"

    @field_validator("audit_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value


class AdminSettings(Strict):
    """The admin console: the special database `dbproxy` (alias `pgbouncer`) on every endpoint."""

    users: list[str] = Field(
        default_factory=list,
        description="users (with a stored secret) who may log in to the admin console; empty: the console is off")


MAX_FLEET_PROXY_ID = 127  # seven bits of the client ids (see proxy.session.client_ids)
PEER_ADDRESS = r"^\S+:\d{1,5}$"


class FleetSettings(Strict):
    """Several proxies behind one address: a CancelRequest or KILL for a client of another proxy is passed to it.
    Changes take a restart."""

    proxy_id: int = Field(0, ge=0, le=MAX_FLEET_PROXY_ID, description="this proxy's id in the fleet, unique "
                          "among its peers; the client ids it hands out carry it; \"ordinal\": the number that "
                          "ends the host name (a StatefulSet pod's ordinal)")
    port: int = Field(-1, ge=-1, le=65535, description="port of the fleet listener, where peers forward cancels "
                      "and KILLs; -1: no fleet (the ids and behaviour of a single proxy)")
    host: str = Field("", description="address of the fleet listener; empty: [server] host")
    peers: list[Annotated[str, StringConstraints(pattern=PEER_ADDRESS)]] = Field(
        default_factory=list, description="host:port of the peers' fleet listeners; a name with several addresses "
        "(a Kubernetes headless Service) names each of them; this proxy's own address may be among them")
    key_file: Path | None = Field(None, description="a file holding the key shared by the fleet (HMAC of every "
                                  "forward); read at start")
    discovery_interval: float = Field(30.0, gt=0, description="seconds between resolving the peers' names and "
                                      "asking each its proxy id")
    forward_timeout: float = Field(2.0, gt=0, description="seconds a forward to a peer may take, connect included")
    max_clock_skew: float = Field(30.0, gt=0, le=600, description="seconds a signed forward stays valid (its "
                                  "nonce is remembered that long, against replays)")

    @property
    def enabled(self) -> bool:
        return self.port >= 0

    @field_validator("proxy_id", mode="before")
    @classmethod
    def _ordinal(cls, value: object) -> object:
        if value != "ordinal":
            return value
        host = socket.gethostname()
        found = re.search(r"(\d+)$", host)
        if found is None:
            raise ValueError(f"\"ordinal\": the host name {host!r} does not end with a number")
        return int(found.group(1))

    @model_validator(mode="after")
    def _complete(self) -> FleetSettings:
        if self.port == 0:
            raise ValueError("port: give a fixed port (peers list it) or -1")
        if self.enabled and self.key_file is None:
            raise ValueError("port is set: give key_file (every forward is signed with the fleet's key)")
        return self


TokenAlgorithm = Literal["ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
DEFAULT_TOKEN_ALGORITHMS: list[TokenAlgorithm] = ["ES256", "RS256"]


class TokenPolicyRule(Strict):
    """One rule of the token policy (like IAM's rds-db:connect): who (subject, claims) may log in as which users on
    which endpoints; a login is allowed if any rule matches."""

    subject: str = Field("*", description="glob the token's `sub` must match")
    claims: dict[str, str] = Field(
        default_factory=dict, description="claim path ('/' between levels, e.g. 'kubernetes.io/namespace') to a "
        "glob its value must match (a list claim matches if any element does)"
    )
    users: list[str] = Field(
        default_factory=lambda: ["{sub}"], min_length=1,
        description="database users (globs) it may log in as; the literal '{sub}' is the token's subject"
    )
    endpoints: list[str] = Field(default_factory=lambda: ["*"], min_length=1, description="endpoint name globs")


class TokenSettings(Strict):
    """Signed login tokens (JWT) sent as the password: where the public keys come from, what a token must say."""

    keys_dir: Path | None = Field(None, description="folder of `dbproxy keys init`: public keys by key id")
    jwks_file: Path | None = Field(None, description="a JWKS document (JSON) of public keys")
    jwks_url: str = Field("", pattern=r"^(https?://.+)?$", description="a JWKS document fetched over HTTP(S)")
    jwks_ca_file: Path | None = Field(None, description="CA bundle for an https jwks_url (default: the system's)")
    issuers: list[str] = Field(default_factory=lambda: ["dbproxy"], min_length=1, description="accepted `iss`")
    audiences: list[str] = Field(
        default_factory=list, description="accepted `aud` values besides the endpoint's name (always accepted)"
    )
    algorithms: list[TokenAlgorithm] = Field(
        default_factory=lambda: list(DEFAULT_TOKEN_ALGORITHMS), min_length=1,
        description="accepted signature algorithms"
    )
    max_lifetime: float = Field(900.0, gt=0, description="seconds a token may live at most (exp - iat)")
    leeway: float = Field(30.0, ge=0, le=300, description="seconds of clock skew allowed on exp, nbf and iat")
    max_token_size: int = Field(8192, ge=256, le=1 << 20, description="bytes; a longer token is refused unread")
    jwks_cache_ttl: float = Field(3600.0, gt=0, description="seconds fetched keys are used before a refetch")
    jwks_refresh_interval: float = Field(
        30.0, ge=0, description="seconds between two refetches asked by an unknown key id (or a failed fetch)"
    )
    policy: list[TokenPolicyRule] = Field(
        default_factory=list, description="who may log in as whom; none: the subject must be the database user"
    )


class PoolSettings(Strict):
    """RDS Proxy's connection pool knobs, with its meanings and defaults."""

    mode: PoolMode = PoolMode.TRANSACTION
    max_connections: Annotated[
        int | str, Field(description="backend connections for this target: a number or a percent of max_connections")
    ] = "100%"
    max_idle_connections: Annotated[
        int | str, Field(description="idle backend connections kept: a number or a percent of max_connections")
    ] = "50%"
    connection_borrow_timeout: float = Field(120.0, gt=0, description="seconds a client waits for a backend")
    max_connection_lifetime: float = Field(86400.0, gt=0, description="seconds before a backend is replaced")
    init_query: str = ""
    reset_query: str = "DISCARD ALL"
    max_prepared_statements: int = Field(
        256, ge=1, description="prepared statements kept per backend connection (LRU); clients' own are unlimited"
    )
    reserved_connections: int = Field(3, ge=0, description="backend slots left free when sizing by percent")
    internal_query_timeout: float = Field(
        10.0, gt=0, description="seconds the proxy waits on a backend for its own work (session read-back, "
        "settings, reset, cleanup after a client) before it closes that backend"
    )
    replay_max_size: int = Field(
        1024 * 1024, ge=0, description="bytes of a client's current transaction recorded so that it can be replayed "
        "on another server when its backend is lost (failover); a larger transaction is not replayable; 0: off"
    )
    unused_pool_timeout: float = Field(
        60.0, gt=0, description="seconds a pool (per database and user) with no backend connection, no waiting "
        "client and no client session is kept before it is forgotten"
    )

    @field_validator("max_connections", "max_idle_connections")
    @classmethod
    def _count_or_percent(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            if value < 1:
                raise ValueError("must be at least 1")
            return value
        match = PERCENT.match(value)
        if not match or not 1 <= int(match.group(1)) <= 100:
            raise ValueError("must be a positive number or a percent such as '50%'")
        return value


def resolve_count(value: int | str, backend_max: int) -> int:
    """Turn a count-or-percent setting into a number of connections."""
    if isinstance(value, int):
        return value
    match = PERCENT.match(value)
    assert match is not None
    return max(1, backend_max * int(match.group(1)) // 100)



NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"  # endpoint names appear as listener names ("<name> port <n>")
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
RESERVED_NAMES = frozenset({"metrics", "listeners", "api", "health", "fleet"})  # other listeners of the ready line


class InstanceRole(StrEnum):
    WRITER = "writer"
    READER = "reader"


class EndpointRole(StrEnum):
    READ_WRITE = "read_write"  # the cluster's writer
    READ_ONLY = "read_only"  # a reader
    CUSTOM = "custom"  # a member of a static list (members) or of the cluster minus a list (exclude)


class Instance(Strict):
    """One database server of a cluster; `role` is a hint until the proxy discovers roles itself."""

    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    name: str = Field("", description="how endpoints' member lists name it; empty means host:port")
    zone: str = ""
    region: str = ""
    role: InstanceRole | None = None

    @property
    def label(self) -> str:
        return self.name or f"{self.host}:{self.port}"


PARAMETER_NAME = r"^[A-Za-z_][A-Za-z0-9_.]{0,62}$"  # a PostgreSQL GUC or MySQL system variable, as written
ParameterValue = str | bool | int | float
PARAMETER_GROUP_HELP = "the parameter group (of [<engine>.parameter_groups]) its sessions get by default"


class ParameterGroup(Strict):
    """Named session parameters a user's backend sessions get by default (the client's own settings win)."""

    parameters: dict[str, ParameterValue] = Field(
        default_factory=dict, description="dynamic parameters: set on a backend session when a client borrows it")
    static_parameters: dict[str, ParameterValue] = Field(
        default_factory=dict, description="static parameters: given when a backend connects (PostgreSQL startup "
        "options, MySQL SET right after the login); a change replaces the backends")
    users: list[str] = Field(default_factory=list, description="users that get this group on every endpoint of "
                                                               "the engine (over the endpoint's and cluster's group)")
    static_apply: Literal["reload", "command"] = Field(
        "reload", description="when changed static parameters replace backends: at the reload (idle ones at once, "
        "lent-out ones when given back), or at `dbproxy control params apply`")

    @field_validator("parameters", "static_parameters")
    @classmethod
    def _check_parameters(cls, given: dict[str, ParameterValue]) -> dict[str, ParameterValue]:
        for name, value in given.items():
            if not re.match(PARAMETER_NAME, name):
                raise ValueError(f"{name!r} is not a parameter name (letters, digits, _ and .)")
            if "\x00" in str(value):
                raise ValueError(f"the value of {name!r} holds a NUL character")
        return given

    @model_validator(mode="after")
    def _check_overlap(self) -> ParameterGroup:
        both = {name.lower() for name in self.parameters} & {name.lower() for name in self.static_parameters}
        if both:
            raise ValueError(f"{', '.join(sorted(both))}: both dynamic and static")
        return self


class EndpointBase(Strict):
    """A client-facing listener on one cluster; pool and auth keys given here override the cluster's."""

    port: int = Field(ge=0, le=65535, description="client-facing port; 0 picks a free one")
    cluster: str
    role: EndpointRole = EndpointRole.READ_WRITE
    members: list[str] | None = Field(None, description="custom endpoint: these instances, in this order")
    exclude: list[str] | None = Field(None, description="custom endpoint: every instance but these")
    max_replica_lag: float | None = Field(
        None, ge=0, description="read_only endpoint: the cluster's max_replica_lag for this endpoint only"
    )
    reader_fallback: bool | None = Field(
        None, description="read_only endpoint: the cluster's reader_fallback for this endpoint only"
    )
    causal_reads: bool = Field(
        False, description="read_only endpoint: every transaction sees the writes committed (through any endpoint) "
        "before it began: the replica first replays up to the writer's position, else the writer serves it"
    )
    causal_read_timeout: float = Field(
        1.0, gt=0, le=60, description="seconds a causal read waits for its replica to catch up before the writer "
        "serves the transaction instead"
    )
    # Token logins and client TLS for this endpoint (None: the cluster's, else the engine section's).
    token_auth: TokenAuthMode | None = None
    token_auth_users: dict[str, TokenAuthMode] | None = Field(None, description="user -> token_auth for that user")
    require_tls: bool | None = Field(None, description="refuse plaintext logins to this endpoint")
    allowed_cidrs: list[CIDR] | None = Field(None, description=ALLOWED_CIDRS_HELP + "; default: the cluster's")
    pool: PoolSettings = PoolSettings()  # only the keys given apply
    parameter_group: str | None = Field(None, description=PARAMETER_GROUP_HELP + "; default: the cluster's")


class ClusterBase(Strict):
    """Instances of one database cluster; pool and auth keys given here are defaults for its endpoints."""

    instances: list[Instance] = Field(min_length=1)
    backend_tls: BackendTLSMode | None = None
    backend_ca_file: Path | None = None
    backend_connect_timeout: float | None = Field(None, gt=0)
    monitor_interval: float = Field(
        0.0, ge=0, description="seconds between probes of every instance (roles, health, lag); 0: no monitoring"
    )
    monitor_user: str = Field("", description="the user the probes log in as (its password from the secrets)")
    max_replica_lag: float = Field(
        30.0, ge=0, description="seconds a reader may be behind the writer and still serve read_only endpoints "
        "(with monitoring; a reader whose lag is not known is left out); 0: no limit"
    )
    reader_fallback: bool = Field(
        True, description="read_only endpoints use the writer while no reader is eligible; false: new work waits "
        "for a reader (at most the borrow timeout)"
    )
    auto_promote: bool = Field(
        False, description="promote the most advanced healthy reader (by timeline, then position; a tie to the "
        "lowest address) when the cluster has had no healthy writer for failover_grace seconds; needs "
        "monitor_interval and a monitor_user allowed to promote"
    )
    failover_grace: float | None = Field(
        None, gt=0, description="seconds without a healthy writer before auto_promote promotes a reader (long "
        "enough for the writer's own restart); default: twice monitor_interval, at least 2 s"
    )
    # Token logins and client TLS for this cluster's endpoints (None: the engine section's).
    token_auth: TokenAuthMode | None = None
    token_auth_users: dict[str, TokenAuthMode] | None = Field(None, description="user -> token_auth for that user")
    require_tls: bool | None = Field(None, description="refuse plaintext logins to its endpoints")
    allowed_cidrs: list[CIDR] | None = Field(
        None, description=ALLOWED_CIDRS_HELP + "; default for its endpoints, else the engine section's")
    pool: PoolSettings = PoolSettings()  # only the keys given apply
    parameter_group: str | None = Field(None, description=PARAMETER_GROUP_HELP + "; default: the engine's")

    @property
    def promotion_grace(self) -> float:
        """failover_grace, or its default: twice monitor_interval, at least 2 s."""
        return self.failover_grace if self.failover_grace is not None else max(2.0, 2 * self.monitor_interval)


# Auth passthrough's default queries. MySQL: the account the server matches for the proxy's own host (the host part
# of USER() on the lookup connection, which comes from where the backend connections come from), an exact host first.
PG_AUTH_QUERY = "SELECT passwd FROM pg_catalog.pg_shadow WHERE usename = $1"
MYSQL_AUTH_QUERY = ("SELECT plugin, authentication_string FROM mysql.user WHERE User = %s"
                    " AND SUBSTRING_INDEX(USER(), '@', -1) LIKE Host"
                    " ORDER BY LOCATE('%%', Host) + LOCATE('_', Host) > 0, LENGTH(Host) DESC LIMIT 1")


class PostgresEndpoint(EndpointBase):
    auth_method: ClientAuthMethod | None = None
    # auth passthrough (the engine section's keys, for this endpoint only)
    auth_passthrough: bool | None = None
    auth_user: str | None = None
    auth_query: str | None = None
    auth_cache_ttl: float | None = Field(None, ge=0)


class PostgresCluster(ClusterBase):
    auth_method: ClientAuthMethod | None = None
    # auth passthrough (the engine section's keys, for this cluster's endpoints)
    auth_passthrough: bool | None = None
    auth_user: str | None = None
    auth_query: str | None = None
    auth_cache_ttl: float | None = Field(None, ge=0)


class PostgresSettings(Strict):
    """The PostgreSQL listener and its backend target."""

    enabled: bool = True
    port: int = Field(6432, ge=0, le=65535, description="client-facing port; 0 picks a free one")
    auth_method: ClientAuthMethod = ClientAuthMethod.SCRAM_SHA_256
    backend_host: str = "127.0.0.1"
    backend_port: int = Field(5432, ge=1, le=65535)
    backend_tls: BackendTLSMode = BackendTLSMode.DISABLE
    backend_ca_file: Path | None = None
    backend_connect_timeout: float = Field(10.0, gt=0)
    server_version: str = Field("", description="server_version shown to clients; empty means the backend's")
    sequence_hold: float = Field(
        0.2, ge=0, le=10, description="seconds a client keeps its backend after a transaction that may have set a "
        "sequence value it did not fetch (so a later lastval()/currval() is its own); 0 turns the hold off"
    )
    session_pinning_filters: list[Literal["exclude_variable_sets"]] = Field(
        default_factory=list,
        description="RDS Proxy SessionPinningFilters: exclude_variable_sets stops tracking SET statements",
    )
    # auth passthrough: a user with no stored secret is checked against the database (proxy.auth.pg_passthrough)
    auth_passthrough: bool = Field(
        False, description="users without a stored secret log in with their database password: the proxy looks "
        "up their SCRAM verifier with auth_query as auth_user and logs in to the backend with their SCRAM keys")
    auth_user: str = Field("", description="the user (with a stored secret) that runs auth_query")
    auth_query: str = Field(PG_AUTH_QUERY, description="returns the verifier (pg_shadow.passwd) of the user $1")
    auth_cache_ttl: float = Field(60.0, ge=0, description="seconds a found verifier is kept; 0: looked up each time")
    # Token logins and client TLS (clusters and endpoints may override each key).
    token_auth: TokenAuthMode = Field(
        TokenAuthMode.DISABLED, description="signed login tokens sent as the password: disabled, required or optional"
    )
    token_auth_users: dict[str, TokenAuthMode] = Field(
        default_factory=dict, description="user -> token_auth for that user (over token_auth)"
    )
    require_tls: bool = Field(False, description="refuse plaintext logins (the [tls] mode applies too)")
    allowed_cidrs: list[CIDR] | None = Field(
        None, description=ALLOWED_CIDRS_HELP + "; default for every endpoint of the engine")
    pool: PoolSettings = PoolSettings()
    parameter_group: str = Field("", description=PARAMETER_GROUP_HELP + "; empty: none")
    parameter_groups: dict[Name, ParameterGroup] = Field(default_factory=dict)
    clusters: dict[Name, PostgresCluster] = Field(default_factory=dict)
    endpoints: dict[Name, PostgresEndpoint] = Field(default_factory=dict)


class MySQLAuthMethod(StrEnum):
    NATIVE = "mysql_native_password"
    CACHING_SHA2 = "caching_sha2_password"
    CLEAR = "mysql_clear_password"  # accepted only over TLS


class MySQLPoolSettings(PoolSettings):
    """The pool knobs for MySQL: a backend is always reset with COM_RESET_CONNECTION; reset_query runs after it."""

    reset_query: str = ""


class MySQLEndpoint(EndpointBase):
    auth_method: MySQLAuthMethod | None = None
    caching_sha2_full_auth: bool | None = None
    # auth passthrough (the engine section's keys, for this endpoint only)
    auth_passthrough: bool | None = None
    auth_user: str | None = None
    auth_query: str | None = None
    auth_cache_ttl: float | None = Field(None, ge=0)
    pool: MySQLPoolSettings = MySQLPoolSettings()  # only the keys given apply


class MySQLCluster(ClusterBase):
    auth_method: MySQLAuthMethod | None = None
    caching_sha2_full_auth: bool | None = None
    # auth passthrough (the engine section's keys, for this cluster's endpoints)
    auth_passthrough: bool | None = None
    auth_user: str | None = None
    auth_query: str | None = None
    auth_cache_ttl: float | None = Field(None, ge=0)
    pool: MySQLPoolSettings = MySQLPoolSettings()  # only the keys given apply


class MySQLSettings(Strict):
    """The MySQL/MariaDB listener and its backend target (off unless the configuration turns it on)."""

    enabled: bool = False
    port: int = Field(6033, ge=0, le=65535, description="client-facing port; 0 picks a free one")
    auth_method: MySQLAuthMethod = MySQLAuthMethod.NATIVE
    caching_sha2_full_auth: bool = Field(
        False, description="ask caching_sha2_password clients for full authentication (TLS or RSA) every time"
    )
    rsa_private_key_file: Path | None = None
    backend_host: str = "127.0.0.1"
    backend_port: int = Field(3306, ge=1, le=65535)
    backend_tls: BackendTLSMode = BackendTLSMode.DISABLE
    backend_ca_file: Path | None = None
    backend_connect_timeout: float = Field(10.0, gt=0)
    server_version: str = Field("", description="version shown to clients; empty means the backend's")
    local_infile: bool = Field(True, description="pass LOAD DATA LOCAL INFILE through; false refuses it")
    session_pinning_filters: list[Literal["exclude_variable_sets"]] = Field(
        default_factory=list,
        description="RDS Proxy SessionPinningFilters: exclude_variable_sets lets SET statements the proxy cannot "
        "track run without pinning",
    )
    # auth passthrough: a user with no stored secret is checked against the database (proxy.auth.mysql_passthrough)
    auth_passthrough: bool = Field(
        False, description="users without a stored secret log in with their database password: the proxy looks "
        "up their mysql_native_password hash with auth_query as auth_user and logs in to the backend with it")
    auth_user: str = Field("", description="the user (with a stored secret) that runs auth_query")
    auth_query: str = Field(MYSQL_AUTH_QUERY, description="returns (plugin, authentication_string) of the user %s "
                            "(a literal percent sign is written %%)")
    auth_cache_ttl: float = Field(60.0, ge=0, description="seconds a found hash is kept; 0: looked up each time")
    # Token logins and client TLS (clusters and endpoints may override each key).
    token_auth: TokenAuthMode = Field(
        TokenAuthMode.DISABLED, description="signed login tokens sent as the password: disabled, required or optional"
    )
    token_auth_users: dict[str, TokenAuthMode] = Field(
        default_factory=dict, description="user -> token_auth for that user (over token_auth)"
    )
    require_tls: bool = Field(False, description="refuse plaintext logins (the [tls] mode applies too)")
    allowed_cidrs: list[CIDR] | None = Field(
        None, description=ALLOWED_CIDRS_HELP + "; default for every endpoint of the engine")
    pool: MySQLPoolSettings = MySQLPoolSettings()
    parameter_group: str = Field("", description=PARAMETER_GROUP_HELP + "; empty: none")
    parameter_groups: dict[Name, ParameterGroup] = Field(default_factory=dict)
    clusters: dict[Name, MySQLCluster] = Field(default_factory=dict)
    endpoints: dict[Name, MySQLEndpoint] = Field(default_factory=dict)


class CacheRule(Strict):
    """One opt-in rule of the query result cache: statements of an endpoint it matches are cached for `ttl`."""

    endpoint: str = Field("*", description="endpoint name glob (the single-backend form: postgresql or mysql)")
    regex: str | None = Field(None, description="a Python regular expression searched in the statement's text")
    digest: str | None = Field(None, description="a statement digest, as the statement statistics show it")
    ttl: float = Field(60.0, gt=0, le=86400, description="seconds a result is served from the cache")

    @model_validator(mode="after")
    def _one_match(self) -> CacheRule:
        if (self.regex is None) == (self.digest is None):
            raise ValueError("give regex or digest (one of them)")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex {self.regex!r} does not compile: {exc}") from None
        return self


class QueryCacheSettings(RedisClientSettings):
    """The query result cache: opt-in per endpoint by rules or by a SQL-comment hint; in-process or in Redis."""

    enabled: bool = False
    store: Literal["local", "redis"] = "local"
    max_bytes: int = Field(64 << 20, ge=0, description="local store: bytes of results kept (least recent evicted)")
    max_result_bytes: int = Field(1 << 20, gt=0, description="largest result (reply bytes) cached")
    hints: bool = Field(False, description="honour /* dbproxy:cache ttl=N */ in a statement's text")
    hint_endpoints: list[str] = Field(default_factory=lambda: ["*"], description="endpoint globs hints apply to")
    max_hint_ttl: float = Field(3600.0, gt=0, description="a hint's ttl is capped at this many seconds")
    rules: list[CacheRule] = Field(default_factory=list)
    redis_key_prefix: str = "dbproxy:qc:"


class Config(Strict):
    """The whole configuration."""

    server: ServerSettings = ServerSettings()
    api: ApiSettings = ApiSettings()
    tls: TLSSettings = TLSSettings()
    secrets: SecretsSettings = SecretsSettings()
    postgresql: PostgresSettings = PostgresSettings()
    mysql: MySQLSettings = MySQLSettings()
    tokens: TokenSettings = TokenSettings()
    auth: AuthSettings = AuthSettings()
    admin: AdminSettings = AdminSettings()
    fleet: FleetSettings = FleetSettings()
    query_cache: QueryCacheSettings = QueryCacheSettings()

    @model_validator(mode="after")
    def _local_cache_one_process(self) -> Config:
        cache = self.query_cache
        if cache.enabled and cache.store == "local" and self.server.workers != 1:
            raise ValueError("query_cache.store = \"local\" is one process's: set server.workers = 1, or use "
                             "store = \"redis\" (shared by every worker and proxy, invalidations included)")
        return self


def _describe(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"unknown key '{where}'"
    return f"'{where}': {error['msg']}"


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make relative file paths in the file relative to the file's folder."""
    def resolve(part: object, keys: tuple[str, ...]) -> None:
        if isinstance(part, dict):
            for key in keys:
                value = part.get(key)
                if isinstance(value, str) and value and not os.path.isabs(value):
                    part[key] = str(base / value)

    for section, keys in (("server", ("pid_file",)), ("api", ("token_file",)), ("tls", ("cert_file", "key_file")),
                          ("secrets", ("file", "dir", "encrypted_file", "master_key_file")),
                          ("auth", ("audit_file", "redis_ca_file")), ("fleet", ("key_file",)),
                          ("query_cache", ("redis_ca_file",)),
                          ("tokens", ("keys_dir", "jwks_file", "jwks_ca_file")),
                          ("postgresql", ("backend_ca_file",)),
                          ("mysql", ("backend_ca_file", "rsa_private_key_file"))):
        part = data.get(section)
        resolve(part, keys)
        clusters = part.get("clusters") if isinstance(part, dict) else None
        if isinstance(clusters, dict):
            for cluster in clusters.values():
                resolve(cluster, ("backend_ca_file",))


EngineSettings = PostgresSettings | MySQLSettings
ENGINES = ("postgresql", "mysql")
SHORTHAND_KEYS = ("port", "backend_host", "backend_port")  # the single-backend form of an engine section


def engine_settings(config: Config) -> list[tuple[str, EngineSettings]]:
    return [("postgresql", config.postgresql), ("mysql", config.mysql)]


def uses_clusters(settings: EngineSettings) -> bool:
    """Whether the engine section describes clusters and endpoints (else it is the single-backend shorthand)."""
    return bool(settings.clusters or settings.endpoints)


def engine_active(settings: EngineSettings) -> bool:
    """Whether the engine serves clients: `enabled`, which clusters and endpoints turn on unless it says false."""
    if uses_clusters(settings) and "enabled" not in settings.model_fields_set:
        return True
    return settings.enabled


def listener_ports(config: Config) -> list[tuple[str, str, int]]:
    """(name, key in the file, port) of every endpoint that listens."""
    found = []
    for engine, settings in engine_settings(config):
        if not engine_active(settings):
            continue
        if not uses_clusters(settings):
            found.append((engine, f"{engine}.port", settings.port))
        for name, endpoint in settings.endpoints.items():
            found.append((name, f"{engine}.endpoints.{name}.port", endpoint.port))
    return found


def _check_engine(engine: str, settings: EngineSettings) -> str | None:
    """The first problem in how an engine section's endpoints refer to its clusters, as "'key': reason"."""
    if not uses_clusters(settings):
        return None
    for key in SHORTHAND_KEYS:
        if key in settings.model_fields_set:
            return (f"'{engine}.{key}': the single-backend form ({', '.join(SHORTHAND_KEYS)} in [{engine}]) "
                    f"cannot be mixed with clusters and endpoints; give instances under [{engine}.clusters.*] "
                    f"and ports under [{engine}.endpoints.*]")
    if not settings.endpoints:
        return f"'{engine}.endpoints': clusters are given but no endpoint serves them"
    for name, cluster in settings.clusters.items():
        labels: set[str] = set()
        writers = 0
        for number, instance in enumerate(cluster.instances):
            if instance.label in labels:
                return f"'{engine}.clusters.{name}.instances.{number}': a second instance named '{instance.label}'"
            labels.add(instance.label)
            writers += instance.role is InstanceRole.WRITER
        if writers > 1:
            return f"'{engine}.clusters.{name}.instances': more than one instance has role \"writer\""
        if cluster.monitor_interval > 0 and not cluster.monitor_user:
            return f"'{engine}.clusters.{name}.monitor_user': monitor_interval is set but no monitor_user is given"
        if cluster.auto_promote and cluster.monitor_interval <= 0:
            return f"'{engine}.clusters.{name}.auto_promote': needs monitor_interval (the monitor sees the writer go)"
    for name, endpoint in settings.endpoints.items():
        key = f"{engine}.endpoints.{name}"
        if name in RESERVED_NAMES or (name in ENGINES and name != engine):
            return f"'{key}': the name '{name}' is reserved"
        found = settings.clusters.get(endpoint.cluster)
        if found is None:
            known = ", ".join(sorted(settings.clusters)) or "none"
            return f"'{key}.cluster': no cluster '{endpoint.cluster}' in [{engine}.clusters] (known: {known})"
        for reader_key in ("max_replica_lag", "reader_fallback"):
            if getattr(endpoint, reader_key) is not None and endpoint.role is not EndpointRole.READ_ONLY:
                return f"'{key}.{reader_key}': only a read_only endpoint chooses among readers"
        problem = _check_members(key, endpoint, found) or _check_causal(key, endpoint, found, settings)
        if problem:
            return problem
    return None


def _check_parameter_groups(engine: str, settings: EngineSettings) -> str | None:
    """The first parameter group that is named but not defined, or a user given to two groups."""
    groups = settings.parameter_groups
    named = [(f"{engine}.parameter_group", settings.parameter_group or None)]
    named += [(f"{engine}.clusters.{name}.parameter_group", part.parameter_group)
              for name, part in settings.clusters.items()]
    named += [(f"{engine}.endpoints.{name}.parameter_group", part.parameter_group)
              for name, part in settings.endpoints.items()]
    for key, group in named:
        if group is not None and group not in groups:
            return f"'{key}': no parameter group '{group}' in [{engine}.parameter_groups]"
    owners: dict[str, str] = {}
    for name, group_settings in groups.items():
        if group_settings.static_parameters and engine == "mysql":
            return (f"'mysql.parameter_groups.{name}.static_parameters': MySQL takes no parameters at connect "
                    "(a backend's reset would undo a SET); give them under parameters")
        for user in group_settings.users:
            if user in owners:
                return f"'{engine}.parameter_groups.{name}.users': user '{user}' is in group '{owners[user]}' too"
            owners[user] = name
    return None


def _check_causal(key: str, endpoint: EndpointBase, cluster: ClusterBase, settings: EngineSettings) -> str | None:
    """Causal reads: a read_only endpoint of a monitored cluster that has a read_write endpoint (its writer's pools
    serve a transaction whose replica does not catch up in time)."""
    if not endpoint.causal_reads:
        return None
    if endpoint.role is not EndpointRole.READ_ONLY:
        return f"'{key}.causal_reads': only a read_only endpoint has causal reads"
    if cluster.monitor_interval <= 0:
        return (f"'{key}.causal_reads': cluster '{endpoint.cluster}' is not monitored (set its monitor_interval "
                "and monitor_user): causal reads ask the writer for its position")
    if not any(other.cluster == endpoint.cluster and other.role is EndpointRole.READ_WRITE
               for other in settings.endpoints.values()):
        return (f"'{key}.causal_reads': cluster '{endpoint.cluster}' has no read_write endpoint (its pools serve "
                "a causal read whose replica does not catch up in time)")
    return None


def _check_members(key: str, endpoint: EndpointBase, cluster: ClusterBase) -> str | None:
    """A custom endpoint has a member list or an exclusion list naming instances of its cluster; others neither."""
    lists = [(field, names) for field in ("members", "exclude") if (names := getattr(endpoint, field)) is not None]
    if endpoint.role is not EndpointRole.CUSTOM:
        if lists:
            return f"'{key}.{lists[0][0]}': only a custom endpoint (role = \"custom\") has a member list"
        return None
    if len(lists) != 1:
        return f"'{key}': a custom endpoint needs exactly one of 'members' or 'exclude'"
    field, names = lists[0]
    labels = [instance.label for instance in cluster.instances]
    for member in names:
        if member not in labels:
            return (f"'{key}.{field}': '{member}' is not an instance of cluster '{endpoint.cluster}' "
                    f"(instances: {', '.join(labels)})")
    if field == "members" and not names:
        return f"'{key}.members': the member list is empty"
    if field == "exclude" and not set(labels) - set(names):
        return f"'{key}.exclude': excludes every instance of cluster '{endpoint.cluster}'"
    return None


def check_endpoints(config: Config) -> str | None:
    """The first problem with the clusters and endpoints of the whole configuration, as "'key': reason"."""
    for engine, settings in engine_settings(config):
        problem = _check_engine(engine, settings) or _check_parameter_groups(engine, settings)
        if problem:
            return problem
    names: dict[str, str] = {}
    ports: dict[int, str] = {}
    for key, port in (("server.metrics_port", config.server.metrics_port), ("api.port", config.api.port),
                      ("api.health_port", config.api.health_port), ("fleet.port", config.fleet.port)):
        if port > 0:
            if port in ports:
                return f"'{key}': port {port} is already taken by '{ports[port]}'"
            ports[port] = key
    for name, key, port in listener_ports(config):
        if name in names:
            return f"'{key}': a second endpoint named '{name}' (also {names[name]})"
        names[name] = key
        if port and port in ports:
            return f"'{key}': port {port} is already taken by '{ports[port]}'"
        ports[port] = key
    return None


def parse_config(data: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a configuration mapping; errors name each bad key and the source."""
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"{source}: {problems}") from None
    problem = check_endpoints(config)
    if problem:
        raise ConfigError(f"{source}: {problem}")
    return config


def load_config(path: Path | str | None, edit: Callable[[dict[str, Any]], None] | None = None) -> Config:
    """Read and validate a TOML configuration file (None gives the defaults); `edit` changes the file's data
    before it is validated (the endpoints the control API added, changed or removed)."""
    if path is None:
        return Config() if edit is None else parse_config(_edited({}, edit), "<defaults>")
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    _resolve_paths(data, path.resolve().parent)
    return parse_config(data if edit is None else _edited(data, edit), str(path))


def _edited(data: dict[str, Any], edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    edit(data)
    return data
