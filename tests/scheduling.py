"""The order in which `pytest -n N --dist loadfile` hands test files to its processes (conftest.py).

pytest-xdist hands out whole files, those of the most tests first: the costliest files, which start servers,
trainings and clusters, are files of few tests, so they came last, and one process ran the last of them while
the other had nothing left (minutes, on two cores). Here the files measured slowest go first, costliest first,
and the rest follow in pytest-xdist's order, the small ones filling in at the end. Files that share a
session-scoped server (tests/e2e/conftest.py) form one unit: one process runs them all, so the server starts
once, not once in each process (each start loads the model again, ~15 s of a core).
"""

from xdist.scheduler import LoadFileScheduling

E2E = "tests/e2e/"
# the session servers' files, each group run by one process
SHARED_SERVERS = {
    **dict.fromkeys(
        (
            f"{E2E}test_tool_calls.py",
            f"{E2E}test_responses_api.py",
            f"{E2E}test_feature_combinations.py",
            f"{E2E}test_parity_clients.py",
            f"{E2E}test_hostile_adapters.py",
            f"{E2E}test_http_api.py",
        ),
        "e2e: the open server",
    ),
    **dict.fromkeys((f"{E2E}test_hostile_requests.py", f"{E2E}test_auth_backpressure.py"), "e2e: the keyed server"),
}
# the slowest units, slowest first (seconds of a two-core run, the two processes busy): a file not named here
# (new, renamed) is only handed out in pytest-xdist's order
SLOWEST = (
    "e2e: the open server",  # ~450
    f"{E2E}test_adapters_e2e.py",  # ~150
    "e2e: the keyed server",  # ~150
    "tests/fleet/test_ray_serve.py",  # ~150
    "tests/engine/test_kernels.py",  # ~120
    "tests/engine/test_bench_smoke.py",  # ~90
    f"{E2E}test_readme_tour.py",  # ~70
    "tests/test_embedded.py",  # ~50
    "tests/engine/test_prefix_cache.py",  # ~50
    f"{E2E}test_shared_store.py",  # ~45
    "tests/training/test_loop.py",  # ~40
    "tests/fleet/test_ray_stop.py",  # ~35
    "tests/api/test_connections.py",  # ~35
    "tests/api/test_event_loop.py",  # ~30
    "tests/test_foundation.py",  # ~30
    "tests/training/test_bench.py",  # ~25
    "tests/bench/test_http_smoke.py",  # ~25
)


class SlowestFirstFileScheduling(LoadFileScheduling):
    def _split_scope(self, nodeid: str) -> str:
        path = super()._split_scope(nodeid)
        return SHARED_SERVERS.get(path, path)

    def _assign_work_unit(self, node) -> None:  # type: ignore[no-untyped-def]
        if not getattr(self, "_ordered", False):  # the first call: the queue is whole
            rank = {scope: i for i, scope in enumerate(SLOWEST)}
            for scope in sorted(self.workqueue, key=lambda s: rank.get(s, len(SLOWEST))):  # stable: xdist's order
                self.workqueue.move_to_end(scope)
            self._ordered = True
        super()._assign_work_unit(node)
