"""Operator commands on a running proxy (instance readmit, switchover, pause, resume, reconnect, client kill), whatever
transport carries them (the control socket, the HTTP API): each takes a message, asks every worker process for its
part (proxy/local_commands.py) and answers with what they said."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from proxy import channel
from proxy.config import ClusterBase, Config, EndpointRole, engine_settings, uses_clusters
from proxy.endpoints import resolve_endpoints, writer_of
from proxy.errors import ConfigError
from proxy.local_commands import instance_addresses, switched_config
from proxy.params_commands import params_handler
from proxy.secrets import SecretStore
from proxy.sql_logging import switch_handler
from proxy.top_sql import top_handler
from proxy.topology.switchover import AdminConnection, SwitchoverError, connect_admin, guarded

log = logging.getLogger(__name__)

# Sends one message to every worker process and returns their answers (one per worker, an "error" key in those
# that failed or did not answer within the timeout in seconds).
Fanout = Callable[[channel.Message, float], Awaitable[list[channel.Message]]]

DEFAULT_SWITCHOVER_TIMEOUT = 10.0  # seconds writes may be held (and, before that, green may take to catch up)
MAX_SWITCHOVER_TIMEOUT = 600.0
STATEMENT_TIMEOUT = 5.0  # seconds for one administrative statement outside the hold (and to undo the read-only)
HOLD_MARGIN = 10.0  # seconds past the timeout after which a worker releases a held endpoint by itself
ANSWER_MARGIN = 5.0  # seconds a worker has to answer beyond the time its part may take


def channel_fanout(paths: Callable[[], list[Path]]) -> Fanout:
    """Fan out over the workers' internal channel sockets."""

    async def fanout(message: channel.Message, timeout: float) -> list[channel.Message]:
        async def one(path: Path) -> channel.Message:
            try:
                return await channel.ask(path, message, timeout)
            except channel.ChannelError as exc:
                return {"error": "unreachable", "message": f"{path.name} did not answer: {exc}"}

        return list(await asyncio.gather(*(one(path) for path in paths())))

    return fanout


def local_fanout(handlers: Mapping[str, channel.Handler]) -> Fanout:
    """The process is its only worker: call its handlers."""

    async def fanout(message: channel.Message, timeout: float) -> list[channel.Message]:
        handler = handlers[str(message["kind"])]
        try:
            return [await asyncio.wait_for(handler(message), timeout)]
        except TimeoutError:
            return [{"error": "timeout", "message": f"no answer within {timeout:.1f}s"}]

    return fanout


def _error(kind: str, message: str, answers: list[channel.Message] | None = None) -> channel.Message:
    return {"error": kind, "message": message, **({"workers": answers} if answers is not None else {})}


def _failures(answers: list[channel.Message]) -> str:
    return "; ".join(str(answer.get("message", answer["error"])) for answer in answers if "error" in answer)


@dataclass(frozen=True)
class SwitchoverPlan:
    """Which endpoints move, from which cluster (blue) to which (green), and how to reach them."""

    engine: str
    endpoints: list[str]
    blue_name: str
    blue: ClusterBase
    green_name: str
    green: ClusterBase


def plan_switchover(config: Config, to: str, endpoint: str | None) -> SwitchoverPlan:
    """The endpoints to move to cluster `to`: `endpoint`, else every read_write endpoint of the engine not on it."""
    engines = [(engine, settings) for engine, settings in engine_settings(config)
               if uses_clusters(settings) and to in settings.clusters
               and (endpoint is None or endpoint in settings.endpoints)]
    if not engines:
        raise SwitchoverError(f"no cluster {to!r} in the configuration" if endpoint is None
                              else f"no cluster {to!r} with an endpoint {endpoint!r} in the configuration")
    if len(engines) > 1:
        raise SwitchoverError(f"cluster {to!r} is in both engines: name the endpoint with --endpoint")
    engine, settings = engines[0]
    if endpoint is not None:
        chosen = settings.endpoints[endpoint]
        if chosen.role is not EndpointRole.READ_WRITE:
            raise SwitchoverError(f"endpoint {endpoint!r} is {chosen.role}: only a read_write endpoint switches over")
        if chosen.cluster == to:
            raise SwitchoverError(f"endpoint {endpoint!r} is already on cluster {to!r}")
        names = [endpoint]
    else:
        names = [name for name, found in settings.endpoints.items()
                 if found.role is EndpointRole.READ_WRITE and found.cluster != to]
        if not names:
            raise SwitchoverError(f"no read_write endpoint of {engine} outside cluster {to!r}")
    blues = sorted({settings.endpoints[name].cluster for name in names})
    if len(blues) > 1:
        raise SwitchoverError(f"the read_write endpoints are on several clusters ({', '.join(blues)}): name one "
                              "with --endpoint")
    return SwitchoverPlan(engine, names, blues[0], settings.clusters[blues[0]], to, settings.clusters[to])


# Told the running configuration after a switchover (the endpoints under their new cluster) and what moved.
Switched = Callable[[Config, SwitchoverPlan], None]


class Commands:
    """The control socket's handlers. `config` is the running configuration; `switched` is told of a switchover."""

    def __init__(self, config: Callable[[], Config], fanout: Fanout,
                 switched: Switched = lambda _config, _plan: None) -> None:
        self.config = config
        self.fanout = fanout
        self.switched = switched
        self._switching = asyncio.Lock()

    def handlers(self) -> dict[str, channel.Handler]:
        return {name: self._guard(handler) for name, handler in (
            ("readmit", self.readmit), ("switchover", self.switchover), ("pause", self.pause),
            ("resume", self.resume), ("reconnect", self.reconnect), ("kill-client", self.kill_client),
            ("top", top_handler(self.fanout)), ("params", params_handler(self.fanout)),
            ("sql-logging", switch_handler(self.fanout, self._endpoint_known)))}

    def _endpoint_known(self, name: str) -> bool:
        return any(endpoint.name == name for endpoint in resolve_endpoints(self.config()))

    async def pause(self, message: channel.Message) -> channel.Message:
        """{"endpoint": NAME | None}: hold new transactions on the endpoint (every one) until resumed."""
        return await self._each_endpoint("pause", "paused", message)

    async def resume(self, message: channel.Message) -> channel.Message:
        return await self._each_endpoint("resume", "resumed", message)

    async def reconnect(self, message: channel.Message) -> channel.Message:
        """{"endpoint": NAME | None}: replace every backend connection (idle now, lent-out when given back)."""
        return await self._each_endpoint("reconnect", "reconnecting", message)

    async def _each_endpoint(self, kind: str, done: str, message: channel.Message) -> channel.Message:
        endpoint = message.get("endpoint")
        if endpoint is not None:
            endpoint = str(endpoint)
            if endpoint not in {found.name for found in resolve_endpoints(self.config())}:
                return _error("unknown_endpoint", f"no endpoint {endpoint!r} in the configuration")
        answers = await self.fanout({"kind": kind, "endpoint": endpoint}, ANSWER_MARGIN)
        failed = _failures(answers)
        names = sorted({str(name) for answer in answers for name in answer.get("endpoints", [])})
        if failed:
            return _error("failed", f"{kind}: not every worker answered: {failed}", answers)
        log.warning("control: %s %s", done, ", ".join(names) or "no endpoint")
        return {"ok": True, "endpoints": names, "message": f"{done}: {', '.join(names) or 'no endpoint'}",
                "workers": answers}

    async def kill_client(self, message: channel.Message) -> channel.Message:
        """{"id": N}: end the client with that id (PostgreSQL BackendKeyData process id, MySQL connection id) with
        an admin-shutdown error, in whichever worker serves it."""
        try:
            number = int(message["id"])
        except (KeyError, TypeError, ValueError):
            return _error("bad_request", "give the client id as a number")
        if not 0 < number < 1 << 32:
            return _error("bad_request", "a client id is a number from 1 to 4294967295")
        answers = await self.fanout({"kind": "kill-client", "id": number}, ANSWER_MARGIN)
        killed = [answer for answer in answers if answer.get("killed")]
        if not killed:
            failed = _failures(answers)
            return _error("unknown_client", f"no client {number} is connected" + (f" ({failed})" if failed else ""))
        return {"ok": True, "message": f"client {number} ({killed[0].get('peer')}) ended", "id": number}

    @staticmethod
    def _guard(handler: channel.Handler) -> channel.Handler:
        async def guarded_handler(message: channel.Message) -> channel.Message:
            try:
                return await handler(message)
            except Exception as exc:
                log.exception("control: %s failed", message.get("kind"))
                return _error("failed", f"{type(exc).__name__}: {exc}")
        return guarded_handler

    async def readmit(self, message: channel.Message) -> channel.Message:
        """{"instance": NAME}: let a fenced instance be chosen as a writer again, in every worker."""
        name = str(message.get("instance", ""))
        if not instance_addresses(self.config(), name):
            return _error("unknown_instance", f"no instance {name!r} in the configuration (an instance is named "
                                              "by its name or its host:port)")
        answers = await self.fanout({"kind": "readmit", "instance": name}, ANSWER_MARGIN)
        done = [answer for answer in answers if answer.get("readmitted")]
        if not done:
            failed = _failures(answers)
            return _error("not_fenced", f"instance {name} is not fenced" + (f" ({failed})" if failed else ""),
                          answers)
        log.warning("control: instance %s re-admitted in %d of %d workers", name, len(done), len(answers))
        return {"ok": True, "message": f"instance {name} re-admitted ({len(done)} of {len(answers)} workers had "
                                       "fenced it)", "workers": answers}

    async def switchover(self, message: channel.Message) -> channel.Message:
        """{"to": CLUSTER, "endpoint": NAME | None, "timeout": S}: move read_write endpoints to another cluster."""
        if self._switching.locked():
            return _error("busy", "a switchover is already running")
        timeout = float(message.get("timeout") or DEFAULT_SWITCHOVER_TIMEOUT)
        if not 0 < timeout <= MAX_SWITCHOVER_TIMEOUT:
            return _error("bad_request", f"the timeout must be more than 0 and at most {MAX_SWITCHOVER_TIMEOUT:.0f} "
                                         "seconds")
        async with self._switching:
            endpoint = message.get("endpoint")
            try:
                plan = plan_switchover(self.config(), str(message.get("to", "")),
                                       None if endpoint is None else str(endpoint))
                return await Switchover(plan, self.config(), self.fanout, timeout, self.switched).run()
            except SwitchoverError as exc:
                log.error("switchover refused or called off: %s", exc)
                return _error("switchover_failed", str(exc))


class Switchover:
    """One switchover: catch green up, hold the endpoints in every worker, make blue read-only, wait until green
    has applied blue's last position, promote green, then move the endpoints (or undo it all and say why)."""

    def __init__(self, plan: SwitchoverPlan, config: Config, fanout: Fanout, timeout: float,
                 switched: Switched) -> None:
        self.plan = plan
        self.config = config
        self.fanout = fanout
        self.timeout = timeout
        self.switched = switched
        try:
            self.secrets = SecretStore.from_settings(config.secrets)
        except ConfigError as exc:
            raise SwitchoverError(f"the secrets cannot be read: {exc}") from None

    def _login(self, cluster: ClusterBase, name: str) -> tuple[str, str]:
        secret = self.secrets.backend_login(cluster.monitor_user) if cluster.monitor_user else None
        if secret is None:
            raise SwitchoverError(f"cluster {name}: no monitor_user with a password in the secrets to administer it")
        return cluster.monitor_user, secret.password.decode()

    async def _blue_address(self) -> tuple[str, int]:
        answers = await self.fanout({"kind": "switchover-targets", "endpoints": self.plan.endpoints}, ANSWER_MARGIN)
        if any("error" in answer for answer in answers):
            raise SwitchoverError(f"the workers could not say where the endpoints point: {_failures(answers)}")
        addresses = {(str(target["host"]), int(target["port"]))
                     for answer in answers for target in answer["targets"].values()}
        if len(addresses) != 1:
            raise SwitchoverError("the endpoints do not all point at one writer now ("
                                  + ", ".join(f"{host}:{port}" for host, port in sorted(addresses)) + ")")
        return addresses.pop()

    async def run(self) -> channel.Message:
        plan = self.plan
        blue_user, blue_password = self._login(plan.blue, plan.blue_name)
        green_user, green_password = self._login(plan.green, plan.green_name)
        green_instance = writer_of(plan.green.instances)
        green_address = (green_instance.host, green_instance.port)
        blue_address = await self._blue_address()
        if blue_address == green_address:
            raise SwitchoverError(f"the endpoints already point at {green_instance.label} of cluster "
                                  f"{plan.green_name}")
        log.warning("switchover: endpoints %s from cluster %s (%s:%d) to cluster %s (%s at %s:%d), within %.1fs",
                    ", ".join(plan.endpoints), plan.blue_name, *blue_address, plan.green_name, green_instance.label,
                    *green_address, self.timeout)
        blue = await connect_admin(plan.engine, *blue_address, blue_user, blue_password, self.timeout)
        try:
            green = await connect_admin(plan.engine, *green_address, green_user, green_password, self.timeout)
        except SwitchoverError:
            await blue.close()
            raise
        try:
            if not await guarded("asking whether it replicates", green.where, green_password, green.is_replica(),
                                 STATEMENT_TIMEOUT):
                raise SwitchoverError(f"{green.where} (cluster {plan.green_name}) does not replicate: nothing "
                                      "guarantees it has blue's writes")
            # Catch up before holding anything: the hold then only waits for the last few transactions.
            position = await guarded("reading the position", blue.where, blue_password, blue.position(),
                                     STATEMENT_TIMEOUT)
            await guarded("waiting for the replica", green.where, green_password,
                          green.wait_applied(position, self.timeout), self.timeout + STATEMENT_TIMEOUT)
            return await self._switch(blue, blue_password, green, green_password)
        finally:
            await blue.close()
            await green.close()

    async def _switch(self, blue: AdminConnection, blue_password: str, green: AdminConnection,
                      green_password: str) -> channel.Message:
        plan = self.plan
        endpoints = plan.endpoints
        held_at = time.monotonic()
        deadline = held_at + self.timeout

        def remaining() -> float:
            return max(0.0, deadline - time.monotonic())

        answers = await self.fanout({"kind": "switchover-prepare", "endpoints": endpoints, "timeout": self.timeout,
                                     "hold": self.timeout + HOLD_MARGIN}, self.timeout + ANSWER_MARGIN)
        read_only_asked = False
        steps: list[str] = []

        def step(what: str) -> None:
            steps.append(f"{what} {(time.monotonic() - held_at) * 1000:.0f}")

        try:
            if any("error" in answer for answer in answers):
                raise SwitchoverError(f"not every worker could hold the endpoints: {_failures(answers)}")
            if remaining() <= 0:
                raise SwitchoverError(f"the open transactions took longer than {self.timeout:.1f}s to finish")
            step("drained (workers: " + "/".join(str(answer.get("drained_ms")) for answer in answers) + ")")
            read_only_asked = True
            await guarded("making it read-only", blue.where, blue_password, blue.make_read_only(), remaining())
            step("read-only")
            position = await guarded("reading the position", blue.where, blue_password, blue.position(),
                                     remaining())
            await guarded("waiting for the replica", green.where, green_password,
                          green.wait_applied(position, remaining()), remaining() + 1.0)
            step("caught up")
            await guarded("promoting it", green.where, green_password, green.promote(max(1.0, remaining())),
                          max(1.0, remaining()) + 1.0)
            step("promoted")
        except SwitchoverError as exc:
            undone = ""
            if read_only_asked:
                try:
                    await guarded("making it writable again", blue.where, blue_password, blue.make_writable(),
                                  STATEMENT_TIMEOUT)
                    undone = f"; {blue.where} is writable again"
                except SwitchoverError as undo_failed:
                    undone = f"; and undoing failed: {undo_failed}"
            await self.fanout({"kind": "switchover-abort", "endpoints": endpoints}, ANSWER_MARGIN)
            held = time.monotonic() - held_at
            log.warning("switchover called off; ms after the hold began: %s", ", ".join(steps) or "none")
            raise SwitchoverError(f"{exc}{undone}; the endpoints stay on cluster {plan.blue_name} "
                                  f"(writes were held {held * 1000:.0f} ms)") from None
        # Green is the writer now: the running configuration says so before the workers move (a worker started
        # again from here on serves green too).
        self.switched(switched_config(self.config, plan.engine, endpoints, plan.green_name), plan)
        committed = await self.fanout({"kind": "switchover-commit", "engine": plan.engine, "endpoints": endpoints,
                                       "cluster": plan.green_name}, ANSWER_MARGIN)
        held = time.monotonic() - held_at
        step("moved")
        failed = _failures(committed)
        log.warning("switchover: endpoints %s now on cluster %s; writes held %.0f ms (ms after the hold began: %s)%s",
                    ", ".join(endpoints), plan.green_name, held * 1000, ", ".join(steps),
                    f" (not every worker answered: {failed})" if failed else "")
        return {"ok": True, "held_ms": round(held * 1000, 1), "cluster": plan.green_name, "endpoints": endpoints,
                "message": f"endpoints {', '.join(endpoints)} moved from cluster {plan.blue_name} to cluster "
                           f"{plan.green_name} ({green.where}); writes held {held * 1000:.0f} ms"
                           + (f"; not every worker answered: {failed}" if failed else ""),
                "workers": committed}
