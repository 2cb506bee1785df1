"""Error tree of the proxy; each error knows its PostgreSQL SQLSTATE and MySQL errno for the wire."""

from __future__ import annotations


class ProxyError(Exception):
    """An error the proxy reports to a client in the protocol's own form."""

    sqlstate = "58000"  # system_error
    mysql_errno = 1105  # ER_UNKNOWN_ERROR
    mysql_sqlstate = "HY000"
    fatal = True

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ProtocolViolation(ProxyError):
    """The peer sent bytes that do not follow the protocol."""

    sqlstate = "08P01"
    mysql_errno = 1043  # ER_HANDSHAKE_ERROR
    mysql_sqlstate = "08S01"


class AuthenticationFailed(ProxyError):
    """Wrong password, unknown user, or a method the connection may not use."""

    sqlstate = "28P01"
    mysql_errno = 1045
    mysql_sqlstate = "28000"


class AuthorizationFailed(ProxyError):
    """The client may not use this authentication method or database; `reason` names why for the audit log."""

    sqlstate = "28000"
    mysql_errno = 1045
    mysql_sqlstate = "28000"

    def __init__(self, message: str, reason: str = "not_authorized") -> None:
        super().__init__(message)
        self.reason = reason


class LoginsThrottled(ProxyError):
    """Too many failed logins from the client's address: its logins are refused until its lockout ends."""

    sqlstate = "28000"  # invalid_authorization_specification
    mysql_errno = 1129  # ER_HOST_IS_BLOCKED
    mysql_sqlstate = "HY000"


class LoginTimeout(ProxyError):
    """The client did not finish its login in time."""

    sqlstate = "08006"
    mysql_errno = 1159  # ER_NET_READ_INTERRUPTED
    mysql_sqlstate = "08S01"


class IdleClientTimeout(ProxyError):
    """The client stayed idle longer than the idle client timeout."""

    sqlstate = "57P05"  # idle_session_timeout
    mysql_errno = 4031
    mysql_sqlstate = "HY000"


class ClientMessageTimeout(ProtocolViolation):
    """The client stopped in the middle of a message for longer than the client message timeout."""

    mysql_errno = 1159  # ER_NET_READ_INTERRUPTED


class BorrowTimeout(ProxyError):
    """No backend connection became free within the connection borrow timeout."""

    sqlstate = "53300"  # too_many_connections
    mysql_errno = 1040
    mysql_sqlstate = "08004"


class TooManyClients(ProxyError):
    """The proxy already serves max_client_connections clients."""

    sqlstate = "53300"  # too_many_connections
    mysql_errno = 1040  # ER_CON_COUNT_ERROR
    mysql_sqlstate = "08004"


class BackendUnavailable(ProxyError):
    """The proxy could not open or keep a connection to the database."""

    sqlstate = "08006"
    mysql_errno = 2013
    mysql_sqlstate = "HY000"

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient  # False: trying again soon will fail the same way (e.g. a certificate)


class BackendUnreachable(BackendUnavailable):
    """No connection to the database could be opened (refused, unreachable, timed out)."""

    mysql_errno = 2003  # CR_CONN_HOST_ERROR, what a client connecting directly would report


class BackendError(ProxyError):
    """The database refused something the proxy asked of it (login, init query)."""

    sqlstate = "08004"  # sqlserver_rejected_establishment_of_sqlconnection
    mysql_errno = 1105
    mysql_sqlstate = "HY000"

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        if sqlstate:
            self.sqlstate = sqlstate


SHUTDOWN_TEXT = "terminating connection: the proxy is shutting down"


class ShuttingDown(ProxyError):
    """The proxy is shutting down."""

    sqlstate = "57P01"  # admin_shutdown
    mysql_errno = 1053
    mysql_sqlstate = "08S01"


class UnknownCommand(ProxyError):
    """A MySQL command byte the proxy does not know or does not serve; the connection stays usable."""

    sqlstate = "08P01"
    mysql_errno = 1047  # ER_UNKNOWN_COM_ERROR
    mysql_sqlstate = "08S01"
    fatal = False


class CommandNotAllowed(ProxyError):
    """A statement this proxy is configured to refuse (e.g. LOAD DATA LOCAL INFILE)."""

    sqlstate = "42501"
    mysql_errno = 1148  # ER_NOT_ALLOWED_COMMAND
    mysql_sqlstate = "42000"
    fatal = False


class NotSupported(ProxyError):
    """A statement form the proxy cannot serve yet."""

    sqlstate = "0A000"
    mysql_errno = 1235  # ER_NOT_SUPPORTED_YET
    mysql_sqlstate = "42000"
    fatal = False


class NoSuchThread(ProxyError):
    """KILL named a connection id the proxy does not know."""

    sqlstate = "42704"
    mysql_errno = 1094  # ER_NO_SUCH_THREAD
    mysql_sqlstate = "HY000"
    fatal = False


class KillDenied(ProxyError):
    """KILL named another user's connection."""

    sqlstate = "42501"
    mysql_errno = 1095  # ER_KILL_DENIED_ERROR
    mysql_sqlstate = "HY000"
    fatal = False


class ConnectionKilled(ProxyError):
    """The connection was ended by KILL from another session."""

    sqlstate = "57P01"
    mysql_errno = 1927  # ER_CONNECTION_KILLED
    mysql_sqlstate = "70100"


class ConsoleDenied(AuthenticationFailed):
    """A login to the admin console by a user who is not one of its admin users."""

    sqlstate = "28000"  # invalid_authorization_specification
    mysql_errno = 1044  # ER_DBACCESS_DENIED_ERROR
    mysql_sqlstate = "42000"


class ConsoleCommandError(ProxyError):
    """A command the admin console does not know or cannot run; the console session stays usable."""

    sqlstate = "42601"  # syntax_error
    mysql_errno = 1064  # ER_PARSE_ERROR
    mysql_sqlstate = "42000"
    fatal = False


class ConfigError(Exception):
    """The configuration file is missing, malformed or holds an unknown or invalid key."""
