"""Plotly figure builders for the app: one fixed colour per class name, the same in every chart.

Pure functions (plotly only, no Streamlit): each takes plain data (dicts/lists as stored in
``metrics.json`` or returned by the core) and returns a ``plotly.graph_objects.Figure``. Missing or
partial data gives a figure with a short note instead of an exception, because metrics files from
older or interrupted training runs may lack a section.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from pages._lib.ui_helpers import fmt_prob

# Colour-blind-safe palette (Okabe-Ito first, then Tableau) so adjacent classes stay distinguishable.
_PALETTE = (
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#8C564B", "#7F7F7F",
    "#BCBD22", "#17BECF", "#393B79", "#AD494A",
)

# Known class names get a fixed colour, so that e.g. "monocyte" is the same colour for every model
# and every task; unknown names fall back to a stable hash of the name (never to their position).
_FIXED: dict[str, str] = {
    # pbs5
    "basophil": "#0072B2",
    "erythroblast": "#D55E00",
    "monocyte": "#009E73",
    "myeloblast": "#CC79A7",
    "seg_neutrophil": "#E69F00",
    # all4
    "Benign": "#009E73",
    "Early": "#E69F00",
    "Pre": "#D55E00",
    "Pro": "#CC79A7",
    # other white-cell names seen in external sets
    "neutrophil": "#E69F00",
    "eosinophil": "#8C564B",
    "lymphocyte": "#56B4E9",
}

STATUS_COLOURS: dict[str, str] = {"ok": "#2E7D32", "review": "#F9A825", "error": "#C62828"}
"""Colour per screening status: ok (green), review (amber), error (red)."""

_FONT = dict(family="Source Sans Pro, Helvetica, Arial, sans-serif", size=13, color="#262730")


def class_colour(name: str) -> str:
    """Hex colour for a class name; fixed for known names, stable hash of the name otherwise.

    Args:
        name: Class name, e.g. ``"monocyte"``.

    Returns:
        A ``"#RRGGBB"`` string, identical on every call and in every chart.
    """
    if name in _FIXED:
        return _FIXED[name]
    h = int(hashlib.sha256(str(name).encode()).hexdigest(), 16)
    return _PALETTE[h % len(_PALETTE)]


def class_colours(classes: Sequence[str]) -> dict[str, str]:
    """Map each class name to :func:`class_colour`."""
    return {c: class_colour(c) for c in classes}


def _layout(fig: go.Figure, title: str | None = None, height: int = 360, **kw) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, x=0.0, xanchor="left") if title else None,
        height=height,
        margin=dict(l=10, r=20, t=50 if title else 20, b=10),
        font=_FONT,
        plot_bgcolor="white",
        paper_bgcolor="white",
        **kw,
    )
    fig.update_xaxes(showgrid=True, gridcolor="#EEEEEE", zeroline=False, automargin=True)
    fig.update_yaxes(showgrid=True, gridcolor="#EEEEEE", zeroline=False, automargin=True)
    return fig


def empty_figure(note: str, height: int = 200) -> go.Figure:
    """A blank figure carrying a centred note (used when data are missing)."""
    fig = go.Figure()
    fig.add_annotation(text=note, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14, color="#666666"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, height=height)


def probability_bar(probabilities: Mapping[str, float] | None, classes: Sequence[str] | None = None,
                    predicted: str | None = None, title: str | None = "Calibrated probability per class") -> go.Figure:
    """Horizontal bar chart of every class's calibrated probability.

    Args:
        probabilities: ``{class: probability in [0, 1]}``; ``None`` or empty gives a note.
        classes: Order of the bars (default: the dict's order). Classes missing from
            ``probabilities`` are drawn as 0.
        predicted: The predicted class; its bar is outlined and its label is bold.
        title: Figure title.

    Returns:
        Figure with one bar per class, x axis 0..100 %.
    """
    if not probabilities:
        return empty_figure("No probabilities (the image could not be classified).")
    order = list(classes) if classes else list(probabilities)
    vals = [float(probabilities.get(c, 0.0)) for c in order]
    labels = [f"<b>{c}</b>" if c == predicted else c for c in order]
    fig = go.Figure(go.Bar(
        x=[v * 100 for v in vals], y=labels, orientation="h",
        marker=dict(color=[class_colour(c) for c in order],
                    line=dict(color=["#262730" if c == predicted else "rgba(0,0,0,0)" for c in order], width=2)),
        text=[fmt_prob(v) for v in vals], textposition="outside", cliponaxis=False,
        hovertemplate="%{y}: %{x:.1f}%<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed", showgrid=False)
    fig.update_xaxes(range=[0, 112], title_text="probability (%)", tickvals=[0, 25, 50, 75, 100])
    return _layout(fig, title, height=max(200, 60 + 42 * len(order)), showlegend=False)


def differential_bar(counts: Mapping[str, int], classes: Sequence[str] | None = None,
                     title: str | None = "Differential (predicted class, all readable images)") -> go.Figure:
    """Bar chart of counts per predicted class with percentages.

    Args:
        counts: ``{class: count}``.
        classes: Bar order (default: dict order); classes with no count are drawn as 0.
        title: Figure title.
    """
    order = list(classes) if classes else list(counts)
    if not order:
        return empty_figure("No results yet.")
    n = [int(counts.get(c, 0)) for c in order]
    total = sum(n)
    text = [f"{k} ({k / total:.0%})" if total else "0" for k in n]
    fig = go.Figure(go.Bar(x=order, y=n, marker_color=[class_colour(c) for c in order], text=text,
                           textposition="outside", cliponaxis=False,
                           hovertemplate="%{x}: %{y}<extra></extra>"))
    fig.update_yaxes(title_text="cells", rangemode="tozero", range=[0, max(n + [1]) * 1.2])
    return _layout(fig, title, height=340, showlegend=False)


def status_bar(counts: Mapping[str, int], title: str | None = None) -> go.Figure:
    """Horizontal stacked bar of ok / review / error counts."""
    fig = go.Figure()
    for s in ("ok", "review", "error"):
        fig.add_trace(go.Bar(x=[int(counts.get(s, 0))], y=["status"], name=s, orientation="h",
                             marker_color=STATUS_COLOURS[s], text=[int(counts.get(s, 0))],
                             textposition="inside", hovertemplate=f"{s}: %{{x}}<extra></extra>"))
    fig.update_layout(barmode="stack", legend=dict(orientation="h", y=-0.3))
    fig.update_yaxes(showticklabels=False)
    return _layout(fig, title, height=150)


def confusion_matrix_heatmap(matrix: Sequence[Sequence[int]] | None, classes: Sequence[str] | None,
                             title: str | None = "Confusion matrix (test split; rows = true class)",
                             columns: Sequence[str] | None = None) -> go.Figure:
    """Heatmap of a confusion matrix coloured by row-normalised rate, annotated with counts and %.

    Args:
        matrix: ``R x C`` counts, rows = true class, columns = suggested class.
        classes: ``R`` row labels (true classes; may include cell types the model does not know).
        title: Figure title.
        columns: ``C`` column labels (suggested classes); default: the row labels (a square matrix).
    """
    columns = list(columns) if columns is not None else (list(classes) if classes else None)
    if not matrix or not classes or len(matrix) != len(classes) or any(len(r) != len(columns) for r in matrix):
        return empty_figure("Confusion matrix not available in metrics.json.")
    rows = [[int(v) for v in r] for r in matrix]
    rates = [[v / sum(r) if sum(r) else 0.0 for v in r] for r in rows]
    text = [[f"{v}<br>{p:.0%}" for v, p in zip(r, pr)] for r, pr in zip(rows, rates)]
    fig = go.Figure(go.Heatmap(
        z=rates, x=list(columns), y=list(classes), text=text, texttemplate="%{text}",
        colorscale="Blues", zmin=0, zmax=1, colorbar=dict(title="row %", tickformat=".0%"),
        hovertemplate="true %{y}<br>predicted %{x}<br>%{text}<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed", title_text="true class", showgrid=False)
    fig.update_xaxes(title_text="suggested class", showgrid=False, side="bottom")
    return _layout(fig, title, height=max(360, 120 + 70 * len(classes)))


def roc_curves(curves: Mapping[str, Mapping[str, Sequence[float]]] | None,
               auc: Mapping[str, float | None] | None = None,
               title: str | None = "One-vs-rest ROC curves (test split)") -> go.Figure:
    """One ROC line per class.

    Args:
        curves: ``{class: {"fpr": [...], "tpr": [...]}}``.
        auc: Optional ``{class: ROC-AUC}`` shown in the legend.
        title: Figure title.
    """
    if not curves:
        return empty_figure("ROC curves not available in metrics.json.")
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash", color="#AAAAAA"),
                             name="chance", hoverinfo="skip"))
    for c, d in curves.items():
        a = (auc or {}).get(c)
        name = f"{c} (AUC {a:.3f})" if isinstance(a, (int, float)) else c
        fig.add_trace(go.Scatter(x=list(d.get("fpr", [])), y=list(d.get("tpr", [])), mode="lines", name=name,
                                 line=dict(color=class_colour(c), width=2),
                                 hovertemplate=f"{c}<br>FPR %{{x:.3f}}<br>TPR %{{y:.3f}}<extra></extra>"))
    fig.update_xaxes(title_text="false positive rate (1 − specificity)", range=[0, 1])
    fig.update_yaxes(title_text="true positive rate (sensitivity)", range=[0, 1.02])
    return _layout(fig, title, height=420, legend=dict(x=0.98, y=0.02, xanchor="right", yanchor="bottom",
                                                       bgcolor="rgba(255,255,255,0.8)"))


def training_curves(history: Mapping[str, Sequence[float]] | None,
                    title: str | None = "Training history") -> go.Figure:
    """Accuracy and loss per epoch for training and validation, side by side.

    Args:
        history: Keras-style ``{"loss": [...], "val_loss": [...], "accuracy": [...], "val_accuracy": [...]}``;
            any key may be missing.
        title: Figure title.
    """
    if not history or not any(history.get(k) for k in ("loss", "val_loss", "accuracy", "val_accuracy")):
        return empty_figure("Training history not available in metrics.json.")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("accuracy", "loss"), horizontal_spacing=0.1)
    styles = {"": dict(color="#0072B2"), "val_": dict(color="#D55E00", dash="dot")}
    for col, metric in ((1, "accuracy"), (2, "loss")):
        for prefix, line in styles.items():
            ys = history.get(prefix + metric) or []
            if not ys:
                continue
            fig.add_trace(go.Scatter(x=list(range(1, len(ys) + 1)), y=list(ys), mode="lines+markers",
                                     marker=dict(size=4), line=line,
                                     name="validation" if prefix else "training", legendgroup=prefix or "train",
                                     showlegend=col == 1), row=1, col=col)
        fig.update_xaxes(title_text="epoch", row=1, col=col)
    return _layout(fig, title, height=340, legend=dict(orientation="h", y=-0.25))


def reliability_diagram(after: Mapping | None, before: Mapping | None = None,
                        ece_after: float | None = None, ece_before: float | None = None,
                        title: str | None = "Reliability diagram (test split)") -> go.Figure:
    """Accuracy against confidence per bin, after (and optionally before) temperature scaling.

    Args:
        after: ``{"bin_lower", "bin_upper", "confidence", "accuracy", "count"}`` lists (None = empty bin).
        before: Same structure for the uncalibrated model, optional.
        ece_after: Expected calibration error after scaling, shown in the legend.
        ece_before: ECE before scaling.
        title: Figure title.
    """
    if not after and not before:
        return empty_figure("Reliability data not available in metrics.json.")
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash", color="#AAAAAA"),
                             name="perfect calibration", hoverinfo="skip"))
    for data, name, ece, colour, dash in ((before, "before scaling", ece_before, "#D55E00", "dot"),
                                          (after, "after temperature scaling", ece_after, "#0072B2", "solid")):
        if not data:
            continue
        pts = [(c, a, n) for c, a, n in zip(data.get("confidence", []), data.get("accuracy", []),
                                             data.get("count", [])) if c is not None and a is not None]
        if not pts:
            continue
        label = f"{name} (ECE {ece:.3f})" if isinstance(ece, (int, float)) else name
        # Each bin's count is printed and its accuracy carries a Wilson 95% interval: a bin of three
        # images can swing to 0% and must look as uncertain as it is.
        from bcc_core.evaluation import wilson

        cis = [wilson(round(a * n), n) for _, a, n in pts]
        shown = data is after
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], name=label,
                                 mode="lines+markers+text" if shown else "lines+markers",
                                 text=[f"n={p[2]}" for p in pts] if shown else None, textposition="bottom right",
                                 textfont=dict(size=10, color="#333333"),
                                 error_y=dict(type="data", symmetric=False, array=[hi - p[1] for p, (lo, hi) in zip(pts, cis)],
                                              arrayminus=[p[1] - lo for p, (lo, hi) in zip(pts, cis)],
                                              thickness=1, width=3) if shown else None,
                                 line=dict(color=colour, dash=dash), marker=dict(size=7),
                                 customdata=[p[2] for p in pts],
                                 hovertemplate="confidence %{x:.2f}<br>accuracy %{y:.2f}<br>n=%{customdata}"
                                               "<extra></extra>"))
    fig.update_xaxes(title_text="mean predicted confidence", range=[0, 1])
    fig.update_yaxes(title_text="observed accuracy", range=[0, 1.02])
    # Legend below the plot: well-calibrated points sit in the top corners where a legend would hide them.
    return _layout(fig, title, height=440, legend=dict(orientation="h", x=0, y=-0.2, yanchor="top"))


def per_class_bars(per_class: Mapping[str, Mapping[str, float | None]] | None,
                   metrics: Sequence[str] = ("precision", "recall", "f1", "specificity"),
                   title: str | None = "Per-class metrics (test split)") -> go.Figure:
    """Grouped bars: for each metric, one bar per class in the class colour."""
    if not per_class:
        return empty_figure("Per-class metrics not available in metrics.json.")
    fig = go.Figure()
    for c, m in per_class.items():
        ys = [m.get(k) for k in metrics]
        fig.add_trace(go.Bar(x=list(metrics), y=[v if v is not None else 0 for v in ys], name=c,
                             marker_color=class_colour(c),
                             hovertemplate=f"{c}<br>%{{x}}: %{{y:.3f}}<extra></extra>"))
    fig.update_layout(barmode="group")
    fig.update_yaxes(range=[0, 1.05])
    return _layout(fig, title, height=340, legend=dict(orientation="h", y=-0.2))
