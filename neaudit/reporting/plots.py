"""Figures for the report, drawn with matplotlib and embedded as base64 PNG (no external
files, and no user string ever reaches the HTML unescaped)."""

from __future__ import annotations

import base64
import io
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from neaudit.vocabulary import CLEAN, NONE  # noqa: E402


def _encode(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _short(text: str, width: int = 38) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def leakage_heatmap(table: pd.DataFrame) -> str | None:
    rows = table[(table.metric == "leakage") & (table.attack != CLEAN)].dropna(subset="value")
    if rows.empty:  # e.g. every clean score is 0, so no leakage is defined
        return None
    grid = rows.pivot_table(index="model", columns="attack", values="value", aggfunc="first")
    grid = grid[sorted(grid.columns, key=lambda a: (a != NONE, a))]
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * grid.shape[1] + 3),
                                    max(2.2, 0.45 * grid.shape[0] + 1.5)))
    image = ax.imshow(grid.to_numpy(dtype=float), vmin=0, vmax=1, cmap="RdYlGn_r", aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [_short(c, 26) for c in grid.columns], rotation=75,
                  ha="right", fontsize=7)
    ax.set_yticks(range(grid.shape[0]), [_short(m) for m in grid.index], fontsize=7)
    fig.colorbar(image, ax=ax, label="leakage (score / clean score)")
    return _encode(fig)


def strength_curves(table: pd.DataFrame) -> str | None:
    rows = table[(table.metric == "leakage") & ~table.attack.isin([NONE, CLEAN])].copy()
    if rows.empty:
        return None
    rows["name"] = rows.attack.str.split("(").str[0]
    rows["strength"] = rows.params.map(_single_number)
    rows = rows.dropna(subset="strength")
    names = [n for n, g in rows.groupby("name") if g.strength.nunique() > 1]
    if not names:
        return None
    cols = min(4, len(names))
    fig, axes = plt.subplots((len(names) + cols - 1) // cols, cols, squeeze=False,
                             figsize=(3.2 * cols, 2.4 * ((len(names) + cols - 1) // cols)))
    for ax, name in zip(axes.flat, names, strict=False):
        group = rows[rows.name == name]
        for model, line in group.groupby("model"):
            line = line.sort_values("strength")
            ax.plot(line.strength, line.value, marker="o", label=_short(model, 24))
        ax.set_title(name, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    return _encode(fig)


def damage_scatter(table: pd.DataFrame) -> str | None:
    leak = table[(table.metric == "leakage") & (table.attack != CLEAN)]
    damage = table[table.metric == "psnr"][["model", "attack", "value"]]
    merged = leak.merge(damage, on=["model", "attack"], suffixes=("", "_psnr"))
    if merged.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for model, group in merged.groupby("model"):
        ax.scatter(group.value_psnr.clip(upper=60), group.value, s=14, label=_short(model, 30))
    ax.set_xlabel("PSNR of the attacked image vs its clean original (dB)")
    ax.set_ylabel("leakage")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=6)
    return _encode(fig)


def retention_bars(table: pd.DataFrame) -> str | None:
    rows = table[(table.metric == "utility_retention") & (table.family.isin(["preprocess",
                                                                           NONE]))]
    if rows.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, max(2, 0.22 * len(rows) + 0.8)))
    ax.barh([_short(a, 30) for a in rows.attack], rows.value, color="#4c72b0")
    ax.errorbar(rows.value, range(len(rows)), xerr=[(rows.value - rows.ci_low).clip(lower=0),
                                                     (rows.ci_high - rows.value).clip(lower=0)],
                fmt="none", ecolor="black", lw=0.8)
    ax.set_xlim(0, 1.1)
    ax.axvline(1.0, color="grey", lw=0.6)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("authorized utility retention")
    return _encode(fig)


def _single_number(params: str) -> float:
    try:
        values = list(json.loads(params).values())
    except (TypeError, ValueError):
        return np.nan
    numeric = [v for v in values if isinstance(v, int | float)]
    return float(numeric[0]) if len(numeric) == 1 else np.nan
