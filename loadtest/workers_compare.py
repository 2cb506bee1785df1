"""The proxy at several `[server] workers` counts side by side on the same data: throughput and CPU per transaction."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from loadtest.results import NOT_AVAILABLE, Result
from loadtest.scenarios import Scenario, ScenarioRunner
from loadtest.targets import PROXY, ProxyProcess, Stack, TargetError

WORKERS_KEY = "workers"


def parse_counts(text: str) -> list[int]:
    """``"1,2"`` -> [1, 2]; raises ValueError for anything but positive integers."""
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or any(count < 1 for count in counts):
        raise ValueError("worker counts must be positive integers, e.g. 1,2")
    return list(dict.fromkeys(counts))


@contextlib.contextmanager
def _proxies(stack: Stack, counts: list[int]) -> Iterator[dict[int, ProxyProcess | str]]:
    """One proxy per worker count (same databases, same code copy, own ports), all stopped afterwards."""
    assert stack.proxy is not None
    started: dict[int, ProxyProcess | str] = {}
    try:
        for count in counts:
            proxy = ProxyProcess(stack.workdir / f"proxy-workers-{count}", stack.postgres, stack.mariadb,
                                 stack.pool_size, code_dir=stack.proxy.code_dir, workers=count)
            try:
                proxy.start()
                started[count] = proxy
            except TargetError as exc:
                started[count] = f"proxy with workers = {count} did not start: {str(exc).splitlines()[0]}"
        yield started
    finally:
        for running in started.values():
            if isinstance(running, ProxyProcess):
                running.stop()


def compare(stack: Stack, runner: ScenarioRunner, scenarios: list[Scenario], counts: list[int]) -> list[Result]:
    """Each scenario (its proxy cell only) against each worker count in turn; results carry ``extra["workers"]``."""
    results: list[Result] = []
    if stack.proxy is None:
        return results
    main_proxy = stack.proxy
    with _proxies(stack, counts) as proxies:
        runner.extra_pools = len(proxies)  # their idle pooled connections stay open beside the others
        try:
            for scenario in (s for s in scenarios if PROXY in s.targets):
                for count, proxy in proxies.items():
                    results.append(_run(stack, runner, scenario, count, proxy))
        finally:
            stack.proxy = main_proxy
            runner.extra_pools = 0
    return results


def _run(stack: Stack, runner: ScenarioRunner, scenario: Scenario, count: int, proxy: ProxyProcess | str) -> Result:
    if isinstance(proxy, str):
        result = Result(scenario.name, scenario.group, scenario.engine, PROXY, status=NOT_AVAILABLE, reason=proxy,
                        concurrency=scenario.concurrency)
    else:
        stack.proxy = proxy
        result = runner.run_one(scenario, PROXY)
        result.extra["processes"] = proxy.process_count()
    result.extra[WORKERS_KEY] = count
    summary = f"{result.throughput:,.1f} {result.unit}" if result.ok else result.status_text()
    print(f"[bench] workers={count} {scenario.name:48} {summary}", file=sys.stderr, flush=True)
    return result
