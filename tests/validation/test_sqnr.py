"""Per-layer SQNR from summed signal and noise energies: a layer whose output went NaN or
infinite ranks as the worst layer (-inf dB), never as a perfect one."""

from __future__ import annotations

import math

from gcupipe.validation.numeric import NumericMetrics, finish_sqnr


def test_a_nan_layer_is_the_worst_not_the_best() -> None:
    sums = {
        "good": [1.0, 0.01],  # 20 dB
        "nan": [1.0, math.nan],
        "inf": [math.inf, 1.0],
        "exact": [1.0, 0.0],
    }
    metrics = finish_sqnr(sums, 2, NumericMetrics())
    assert metrics.sqnr_db["good"] == 20.0
    assert metrics.sqnr_db["nan"] == metrics.sqnr_db["inf"] == -math.inf
    assert metrics.sqnr_db["exact"] == math.inf
    assert set(metrics.worst_layers) == {"nan", "inf"}
