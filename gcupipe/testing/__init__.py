"""Builders of tiny models, real test data and local fakes of remote ends (tests, benchmarks)."""
