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


LEAKAGE = "leakage (score / clean score)"


def leakage_heatmap(table: pd.DataFrame) -> str | None:
    rows = table[(table.metric == "leakage") & (table.attack != CLEAN)].dropna(subset="value")
    if rows.empty:  # e.g. every clean score is 0, so no leakage is defined
        return None
    grid = rows.pivot_table(index="model", columns="attack", values="value", aggfunc="first")
    grid = grid[sorted(grid.columns, key=lambda a: (a != NONE, a))]
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * grid.shape[1] + 3),
                                    max(2.2, 0.45 * grid.shape[0] + 1.5)))
    image = ax.imshow(grid.to_numpy(dtype=float), vmin=0, vmax=1, cmap="RdYlGn_r", aspect="auto")
    # whole labels: display names are short, and the figure grows to fit long attack labels
    ax.set_xticks(range(grid.shape[1]), list(grid.columns), rotation=75, ha="right", fontsize=7)
    ax.set_yticks(range(grid.shape[0]), list(grid.index), fontsize=7)
    ax.set_xlabel("attack (none: the release as it is)", fontsize=8)
    ax.set_ylabel("unauthorized model", fontsize=8)
    fig.colorbar(image, ax=ax, label=f"{LEAKAGE}, 1 and above in one colour")
    return _encode(fig)


def strength_curves(table: pd.DataFrame) -> str | None:
    rows = table[(table.metric == "leakage") & ~table.attack.isin([NONE, CLEAN])].copy()
    if rows.empty:
        return None
    rows["name"] = rows.attack.str.split("(").str[0]
    rows["parameter"] = rows.params.map(lambda p: _single_number(p)[0])
    rows["strength"] = rows.params.map(lambda p: _single_number(p)[1])
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
            ax.plot(line.strength, line.value, marker="o", label=model)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel(group.parameter.iloc[0], fontsize=7)
        ax.set_ylabel("leakage", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    if rows.model.nunique() > 1:  # one legend for every panel: the models are the series
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(4, len(labels)), fontsize=7, title="model", title_fontsize=7)
    return _encode(fig)


def damage_scatter(table: pd.DataFrame) -> str | None:
    leak = table[(table.metric == "leakage") & (table.attack != CLEAN)]
    damage = table[table.metric == "psnr"][["model", "attack", "value"]]
    merged = leak.merge(damage, on=["model", "attack"], suffixes=("", "_psnr"))
    if merged.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for model, group in merged.groupby("model"):
        ax.scatter(group.value_psnr.clip(upper=60), group.value, s=14, label=model)
    ax.set_xlabel("PSNR of the attacked image vs its clean original (dB)")
    ax.set_ylabel(LEAKAGE)
    ax.set_ylim(0, 1.05)
    if merged.model.nunique() > 1:
        ax.legend(fontsize=6, title="model", title_fontsize=6)
    return _encode(fig)


def retention_bars(table: pd.DataFrame) -> str | None:
    rows = table[(table.metric == "utility_retention") & (table.family.isin(["preprocess",
                                                                           NONE]))]
    if rows.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, max(2, 0.22 * len(rows) + 0.8)))
    ax.barh(list(rows.attack), rows.value, color="#4c72b0")
    ax.errorbar(rows.value, range(len(rows)), xerr=[(rows.value - rows.ci_low).clip(lower=0),
                                                     (rows.ci_high - rows.value).clip(lower=0)],
                fmt="none", ecolor="black", lw=0.8)
    ax.set_xlim(0, 1.1)
    ax.axvline(1.0, color="grey", lw=0.6)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("authorized utility retention (score / clean score), 95% interval")
    ax.set_ylabel("preprocessing", fontsize=8)
    return _encode(fig)


def _single_number(params: str) -> tuple[str, float]:
    """The name and value of an attack's only numeric parameter (NaN where it has none or
    several)."""
    try:
        items = json.loads(params).items()
    except (TypeError, ValueError, AttributeError):
        return "", np.nan
    numeric = [(k, v) for k, v in items if isinstance(v, int | float)
               and not isinstance(v, bool)]
    return (numeric[0][0], float(numeric[0][1])) if len(numeric) == 1 else ("", np.nan)
