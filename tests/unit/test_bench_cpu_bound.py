"""The bench's derived bound: the points per second a host's cores allow the server and
PostgreSQL, from their measured CPU per request."""


def test_two_cores_and_20_ms_per_request_allow_100_requests_a_second(bench):
    cpu = {"server": bench.summary([15.0, 16.0, 14.0]), "postgres": bench.summary([5.0])}
    assert bench.points_per_s_cores_allow(cpu, cores=2) == 10_000
    assert bench.points_per_s_cores_allow(cpu, cores=2, points_per_request=10) == 1_000


def test_no_bound_without_postgres_cpu(bench):
    assert bench.points_per_s_cores_allow({"server": bench.summary([10.0]), "postgres": bench.summary([])}, 2) is None
