"""Chart specs built by services/dashboard/charts.py."""

from __future__ import annotations

import pandas as pd

from services.dashboard.charts import Timeline, time_chart
from services.dashboard.data import to_frame

T0 = 1_700_000_000.0


def test_all_zero_series_gets_a_readable_axis() -> None:
    timeline = Timeline(to_frame([], ["worker_id"]), to_frame([], ["worker_id"]))
    series = pd.DataFrame({"time": [pd.Timestamp(T0, unit="s")], "worker_id": ["w1"], "value": [0]})
    flat = time_chart(series, "value", "preemptions", "worker_id", timeline).to_dict()
    assert flat["layer"][0]["encoding"]["y"]["scale"] == {"domain": [0, 1]}
    some = time_chart(series.assign(value=[3]), "value", "n", "worker_id", timeline).to_dict()
    assert "domain" not in some["layer"][0]["encoding"]["y"].get("scale", {})
