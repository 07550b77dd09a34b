"""Charts of `ultraspeed bench report`: pure functions, a data dict in, one PNG out.

They draw on a bare matplotlib `Figure` (Agg canvas) rather than pyplot, so no global figure or backend state
is touched: safe to call from tests, servers and loops.
"""

from __future__ import annotations

from pathlib import Path

DPI = 120


def _figure(width: float = 8.0, height: float = 4.5):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return fig, fig.subplots()


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _legend_below(fig, entries: int) -> None:
    # Below the axes, not on them: a legend inside hides the tallest bars or lines, which are the ones read first.
    fig.legend(loc="outside lower center", ncols=min(4, max(1, entries)), fontsize="small", frameon=False)


def grouped_bars(values: dict[str, dict[str, float]], path: Path, title: str, ylabel: str,
                 xlabel: str = "") -> Path:
    """values[series][group] -> one bar per series inside each group (groups in first-seen order)."""
    groups = list(dict.fromkeys(g for per_group in values.values() for g in per_group))
    fig, ax = _figure(min(14.0, max(8.0, 0.9 * len(groups) + 2)), 4.5)
    width = 0.8 / max(1, len(values))
    for i, (series, per_group) in enumerate(values.items()):
        xs = [j + (i - (len(values) - 1) / 2) * width for j, g in enumerate(groups) if g in per_group]
        ax.bar(xs, [per_group[g] for g in groups if g in per_group], width, label=series)
    ax.set_xticks(range(len(groups)), groups)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(axis="y", alpha=0.3)
    _legend_below(fig, len(values))
    return _save(fig, path)


def lines(series: dict[str, dict[int, float]], path: Path, title: str, xlabel: str, ylabel: str,
          reference: float | None = None) -> Path:
    """series[label][x] -> one line per label; `reference` draws a dashed horizontal line (e.g. 1x speed-up)."""
    fig, ax = _figure()
    for label, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1)
    xticks = sorted({x for points in series.values() for x in points})
    ax.set_xticks(xticks, [str(x) for x in xticks])
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    _legend_below(fig, len(series))
    return _save(fig, path)


def tokens_per_s_chart(rates: dict[str, dict[str, float]], path: Path) -> Path:
    """rates[system][domain] = median tok/s."""
    return grouped_bars(rates, path, "Decode speed per system and domain (median)", "tokens / s")


def accepted_by_block_chart(accepted: dict[str, dict[int, float]], path: Path) -> Path:
    """accepted[label][block size] = mean tokens committed per target forward."""
    return lines(accepted, path, "DFlash mean accepted length by block size", "block size",
                 "tokens per target forward", reference=1.0)


def speedup_by_block_chart(speedups: dict[str, dict[int, float]], path: Path) -> Path:
    """speedups[label][block size] = DFlash tok/s over the same weights' plain tok/s."""
    return lines(speedups, path, "DFlash speed-up over plain decoding by block size", "block size",
                 "speed-up (x)", reference=1.0)


def accepted_histogram_chart(histograms: dict[str, dict[int, int]], path: Path) -> Path:
    """histograms[label][accepted length] = count; drawn as fractions so labels with more steps compare fairly."""
    fractions = {}
    for label, counts in histograms.items():
        total = sum(counts.values()) or 1
        fractions[label] = {str(k): counts.get(k, 0) / total for k in range(1, max(counts, default=1) + 1)}
    return grouped_bars(fractions, path, "Histogram of DFlash accepted lengths", "fraction of target forwards",
                        "tokens committed per target forward")
