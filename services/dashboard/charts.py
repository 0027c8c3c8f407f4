"""Altair charts of the dashboard, built from the frames of :mod:`services.dashboard.data`.

Every time chart shares one layout (a :class:`Timeline`): the series as lines, the
agent's decisions as dashed grey vertical rules (tooltip: action, change, reason) and
OOM events as red rules with a red triangle at the top (tooltip: batch size, guard action, message).
Functions here only build chart specs; drawing is the app's job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import altair as alt
import pandas as pd

CHART_HEIGHT = 220
OOM_COLOR = "#d62728"
DECISION_COLOR = "#7f7f7f"
THRESHOLD_COLOR = "#ff7f0e"
# Solid first, then dashed: the first value of a ``dash`` column is the main series.
DASHES = [[1, 0], [5, 3], [2, 2]]


@dataclass(frozen=True)
class Timeline:
    """What every time chart shares: the event marks and the x range (epoch seconds).

    ``decisions`` and ``ooms`` are frames of :func:`services.dashboard.data.decision_marks`
    and :func:`~services.dashboard.data.oom_marks`; a None bound follows the data.
    """

    decisions: pd.DataFrame
    ooms: pd.DataFrame
    start: float | None = None
    end: float | None = None

    def x(self) -> alt.X:
        """The shared time axis, fixed to the window so that charts line up."""
        if self.start is None or self.end is None:
            return alt.X("time:T", title=None)
        domain = [_datetime(self.start), _datetime(self.end)]
        return alt.X("time:T", title=None, scale=alt.Scale(domain=domain))


def _datetime(ts: float) -> alt.DateTime:
    """An epoch time as a Vega-Lite DateTime (UTC), the form a temporal domain takes."""
    moment = pd.Timestamp(ts, unit="s", tz="UTC")
    return alt.DateTime(
        year=moment.year,
        month=moment.month,
        date=moment.day,
        hours=moment.hour,
        minutes=moment.minute,
        seconds=moment.second,
        milliseconds=moment.microsecond // 1000,
        utc=True,
    )


def decision_rules(decisions: pd.DataFrame, x: alt.X) -> alt.Chart:
    """Vertical dashed rules at each decision, with the reason in the tooltip."""
    return (
        alt.Chart(decisions)
        .mark_rule(color=DECISION_COLOR, strokeDash=[4, 3], strokeWidth=1.5)
        .encode(
            x=x,
            tooltip=[
                alt.Tooltip("time:T", title="decision at", format="%H:%M:%S"),
                alt.Tooltip("worker_id:N", title="worker"),
                alt.Tooltip("action:N"),
                alt.Tooltip("change:N"),
                alt.Tooltip("reason:N"),
            ],
        )
    )


def oom_marks(ooms: pd.DataFrame, x: alt.X) -> alt.LayerChart:
    """Red rules at each OOM event and a red triangle at the top of the chart."""
    tooltip = [
        alt.Tooltip("time:T", title="OOM at", format="%H:%M:%S"),
        alt.Tooltip("worker_id:N", title="worker"),
        alt.Tooltip("batch_size:Q", title="batch size"),
        alt.Tooltip("action:N", title="guard action"),
        alt.Tooltip("message:N"),
    ]
    base = alt.Chart(ooms).encode(x=x, tooltip=tooltip)
    rules = base.mark_rule(color=OOM_COLOR, strokeWidth=2)
    points = base.mark_point(
        color=OOM_COLOR, filled=True, shape="triangle-down", size=90, opacity=1
    ).encode(y=alt.value(4))
    return alt.LayerChart(layer=[rules, points])


def _y_scale(values: pd.Series) -> alt.Scale:
    """Vega's own scale, but 0..1 when every value is 0 (no preemption yet, say): a flat
    zero line would otherwise get a degenerate axis labelled "0.000000"."""
    if pd.to_numeric(values, errors="coerce").fillna(0).abs().max() == 0:
        return alt.Scale(domain=[0, 1])
    return alt.Scale()


def _lines(
    frame: pd.DataFrame,
    value: str,
    title: str,
    color: str,
    dash: str | None,
    x: alt.X,
    extra: Sequence[alt.Tooltip] = (),
) -> alt.Chart:
    """One line per ``color`` (and ``dash``) group; dashes in order of first appearance.

    ``extra`` adds tooltip fields after the value (other columns of ``frame``).
    """
    tooltip = [alt.Tooltip("time:T", format="%H:%M:%S"), alt.Tooltip(f"{color}:N")]
    encoding: dict[str, object] = {
        "x": x,
        "y": alt.Y(f"{value}:Q", title=title, scale=_y_scale(frame[value])),
        "color": alt.Color(f"{color}:N", title=None, scale=alt.Scale(scheme="tableau10")),
    }
    if dash:
        order = [str(v) for v in pd.unique(frame[dash])]
        scale = alt.Scale(domain=order, range=DASHES[: len(order)])
        encoding["strokeDash"] = alt.StrokeDash(f"{dash}:N", title=None, scale=scale)
        tooltip.append(alt.Tooltip(f"{dash}:N"))
    value_tip = alt.Tooltip(f"{value}:Q", title=title, format=",.3~f")
    encoding["tooltip"] = [*tooltip, value_tip, *extra]
    return alt.Chart(frame).mark_line(point=len(frame) < 60).encode(**encoding)


def time_chart(
    frame: pd.DataFrame,
    value: str,
    title: str,
    color: str,
    timeline: Timeline,
    dash: str | None = None,
    extra: Sequence[alt.Tooltip] = (),
) -> alt.LayerChart:
    """``value`` over time, one line per ``color`` (and ``dash``) group, with the event marks."""
    x = timeline.x()
    layers = [
        _lines(frame, value, title, color, dash, x, extra),
        decision_rules(timeline.decisions, x),
        oom_marks(timeline.ooms, x),
    ]
    return alt.LayerChart(layer=layers, height=CHART_HEIGHT)


def _labelled_rules(frame: pd.DataFrame, value: str, label: str, fmt: str) -> list[alt.Chart]:
    """Dashed horizontal rules at ``frame[value]``, each labelled with ``frame[label]``."""
    rules = (
        alt.Chart(frame)
        .mark_rule(color=THRESHOLD_COLOR, strokeDash=[6, 4])
        .encode(y=f"{value}:Q", tooltip=[f"{label}:N", alt.Tooltip(f"{value}:Q", format=fmt)])
    )
    texts = (
        alt.Chart(frame)
        .mark_text(align="left", dx=4, dy=-6, color=THRESHOLD_COLOR)
        .encode(x=alt.value(0), y=f"{value}:Q", text=f"{label}:N")
    )
    return [rules, texts]


def with_target(chart: alt.LayerChart, value: float, label: str) -> alt.LayerChart:
    """``chart`` with a dashed horizontal rule at ``value`` (a target), labelled."""
    target = pd.DataFrame({"value": [value], "label": [label]})
    rules = _labelled_rules(target, "value", "label", ".3f")
    return alt.LayerChart(layer=[*chart.layer, *rules], height=chart.height)


def memory_chart(
    memory: pd.DataFrame, thresholds: pd.DataFrame, timeline: Timeline
) -> alt.LayerChart:
    """Memory used (solid) and total (dashed) in GiB, with the 60% / 85% threshold rules."""
    x = timeline.x()
    layers = [
        _lines(memory, "gib", "GiB", "device", "series", x),
        *_labelled_rules(thresholds, "gib", "level", ".2f"),
        decision_rules(timeline.decisions, x),
        oom_marks(timeline.ooms, x),
    ]
    return alt.LayerChart(layer=layers, height=CHART_HEIGHT)
