"""A simulated payment terminal (POI): the other end of the wire for tests, demo and benchmarks."""
