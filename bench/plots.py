"""PNG plots beside the JSON, drawn with matplotlib's Agg backend (no display needed):
  kl_vocab_<device>.png      KD-loss time and peak memory against vocabulary size
  divergence_<device>.png    JSD and reverse KL: time and peak memory per case and contender, bars
  fused_linear_tokens_<device>.png  fused linear head + JSD time and peak memory against tokens
  rkd_scaling_<device>.png   RKD time and peak memory against N, log-log, with N^2 and N^3 guide
                             lines so the slopes (kdfast's O(N^2) memory against the N^3 of the
                             usual code) can be read off
Each title names the machine the figures came from.
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.harness import MB, machine_label  # noqa: E402

_STYLE = {"kdfast": dict(color="C3", marker="o", linewidth=2.2)}


def _series(records, family, device, series):
    """{contender: [(x, median_s, peak_bytes)]} over the records that ran."""
    out = {}
    for r in records:
        if r.family == family and r.device == device and r.series == series and r.ok:
            out.setdefault(r.contender, []).append((r.x, r.median_s, r.peak_mem_bytes))
    return {k: sorted(v) for k, v in out.items()}


def _guide(ax, xs, y0, power, label):
    """A dashed x**power line through (xs[0], y0)."""
    ys = [y0 * (x / xs[0]) ** power for x in xs]
    ax.plot(xs, ys, linestyle="--", color="0.6", linewidth=1)
    ax.annotate(label, (xs[-1], ys[-1]), fontsize=8, color="0.4", ha="left", va="center")


def _plot(data, title, xlabel, path, guides=()):
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name, pts in data.items():
        style = _STYLE.get(name, dict(marker="s", linewidth=1.4))
        xs = [p[0] for p in pts]
        ax_t.plot(xs, [p[1] * 1e3 for p in pts], label=name, **style)
        mem = [(p[0], p[2] / MB) for p in pts if p[2] is not None and p[2] > 0]
        if mem:
            ax_m.plot([m[0] for m in mem], [m[1] for m in mem], label=name, **style)
    for ax, ylabel in ((ax_t, "forward+backward, median ms"), (ax_m, "peak memory above inputs, MB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    if guides:
        kd = data.get("kdfast") or next(iter(data.values()))
        xs = [p[0] for p in kd]
        if len(xs) >= 2:
            all_xs = sorted({p[0] for pts in data.values() for p in pts})
            for ax, idx in ((ax_t, 1), (ax_m, 2)):
                y0 = kd[0][idx]
                if y0:
                    y0 = y0 * 1e3 if idx == 1 else y0 / MB
                    for power, label in guides:
                        _guide(ax, all_xs, y0, power, label)
    ax_t.legend(fontsize=8)
    if ax_m.lines:
        ax_m.legend(fontsize=8)
    return _save(fig, title, path)


def _save(fig, title, path):
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(records, family, device, title, path):
    """Grouped bars, one group per case and one bar per contender that ran in it (a contender keeps
    its colour across groups), for cases that form no series: time on the left, peak memory above
    the inputs on the right."""
    recs = [r for r in records if r.family == family and r.device == device and r.ok]
    if not recs:
        return None
    cases = list(dict.fromkeys(r.case for r in recs))
    others = [n for n in dict.fromkeys(r.contender for r in recs) if n not in _STYLE]
    palette = [f"C{c}" for c in range(10) if c != 3]  # C3 is kdfast's
    colors = {n: palette[i % len(palette)] for i, n in enumerate(others)}
    colors.update({n: s["color"] for n, s in _STYLE.items()})
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    labelled = set()
    for k, case in enumerate(cases):
        group = [r for r in recs if r.case == case]
        width = 0.8 / len(group)
        for i, r in enumerate(group):
            x = k + (i - (len(group) - 1) / 2) * width
            label = None if r.contender in labelled else r.contender
            labelled.add(r.contender)
            ax_t.bar(x, r.median_s * 1e3, width, label=label, color=colors[r.contender])
            ax_m.bar(x, (r.peak_mem_bytes or 0) / MB, width, label=label, color=colors[r.contender])
    for ax, ylabel in ((ax_t, "forward+backward, median ms"), (ax_m, "peak memory above inputs, MB")):
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=15, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, title, path)


def make_plots(records, info, out_dir):
    """Draws every plot there is data for; returns the paths written."""
    paths = []
    for device in sorted({r.device for r in records}):
        label = machine_label(info, device)
        kl = _series(records, "kl", device, "vocab")
        if kl:
            rows = next(r.params["rows"] for r in records if r.family == "kl" and r.series == "vocab")
            paths.append(_plot(kl, f"KD loss (T=2) vs vocabulary size, {rows} rows fp32, {device}\n{label}",
                               "vocabulary size V", os.path.join(out_dir, f"kl_vocab_{device}.png")))
        div = _bars(records, "divergence", device, f"JSD (beta=0.5) and reverse KL, T=1, {device}\n{label}",
                    os.path.join(out_dir, f"divergence_{device}.png"))
        if div:
            paths.append(div)
        rkd = _series(records, "relation", device, "scaling")
        if rkd:
            D = next(r.params["D"] for r in records if r.family == "relation" and r.series == "scaling")
            paths.append(_plot(rkd, f"RKD distance+angle vs batch size N, D={D} fp32, {device}\n{label}",
                               "N (points per batch)", os.path.join(out_dir, f"rkd_scaling_{device}.png"),
                               guides=((2, "N²"), (3, "N³"))))
        head = _series(records, "fused_linear", device, "tokens")
        if head:
            p = next(r.params for r in records if r.family == "fused_linear" and r.series == "tokens")
            paths.append(_plot(head, f"fused linear head + JSD vs tokens, H={p['Hs']}/{p['Ht']}, V={p['V']} "
                               f"{p['dtype']}, {device}\n{label}", "tokens N",
                               os.path.join(out_dir, f"fused_linear_tokens_{device}.png")))
    return paths
