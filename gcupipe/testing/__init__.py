"""Builders of tiny models, real test data and local fakes of remote ends, for tests and benchmarks."""
