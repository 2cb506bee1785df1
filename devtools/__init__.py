"""Tooling outside the runtime package: throwaway database servers for the demo, the tests and the benchmarks."""
