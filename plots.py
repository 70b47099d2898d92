"""The bench's PNGs: River's speed against its quality (bench.py --plot), and its speedup against model size and
context length (bench.py --plot-scaling). matplotlib is imported only when a plot is drawn."""


def pyplot():
    import matplotlib  # bench.py checked that it is installed
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def sweep_panel(ax, result, comparison, loss, speed):
    """River's tau sweep as a line, each row with a mark of its own as a point, the backbone at (0, 1) and the
    ceiling from the weight products alone."""
    sweep = sorted((row for row in comparison.rows if row.in_sweep), key=lambda row: row.tau)
    ax.plot([loss(row) for row in sweep], [speed(row) for row in sweep], "o-", label="River, tau sweep")
    for i, row in enumerate(sweep):  # labels alternate above and below the curve so neighbours do not overlap
        ax.annotate(f"{row.tau:g}", (loss(row), speed(row)), textcoords="offset points",
                    xytext=(4, 6 if i % 2 else -12), fontsize=8)
    for row in comparison.rows:
        if row.mark is not None and not row.mark.strategies_panel:
            ax.plot(loss(row), speed(row), row.mark.marker, markersize=8, label=row.mark.label)
    for runtime, style in (("llama.cpp", "k^--"), ("ik_llama.cpp", "kv:")):  # the frontiers a CPU user already has
        peers = sorted((row for row in comparison.peers if row.path == runtime), key=loss)
        if peers:
            ax.plot([loss(row) for row in peers], [speed(row) for row in peers], style, label=f"{runtime} types")
            for row in peers:
                ax.annotate(row.kind, (loss(row), speed(row)), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.plot(0, 1, "k*", markersize=12, label=f"backbone ({result['dtype']})")
    ceiling = (result.get("block_split_us") or {}).get("speedup_ceiling_products")
    if ceiling:
        ax.axhline(ceiling, color="C0", ls="--", lw=1, label=f"River at tau {result['tau']:g}: weight products alone")
    ax.set_xlabel("NLL increase over the backbone (nats/token)")
    ax.set_ylabel("decode speedup over the backbone")
    ax.set_title("River: speed against quality", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)  # below: the points fill the axes


def strategies_panel(ax, result, rows, river, loss, speed):
    """The KV strategies without a river beside River at the same tau, on a symlog axis."""
    for row in rows:
        ax.plot(loss(row), speed(row), row.mark.marker, markersize=9, mew=2, label=row.mark.label)
    ax.plot(loss(river), speed(river), "o", label=f"River (tau {result['tau']:g})")
    ax.set_xscale("symlog", linthresh=0.05)
    ax.set_xlabel("NLL increase over the backbone (nats/token, symlog)")
    ax.set_title("KV strategies without a river, same exit rule", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot(result, comparison, path):
    """River's speed against its quality over the tau sweep, beside the whole-model low-bit points; the KV
    strategies without a river, whose losses are orders of magnitude larger, in a panel of their own."""
    plt = pyplot()
    modes, base = result["modes"], result["modes"][comparison.backbone.name]
    speed = lambda row: modes[row.name]["decode_tokens_per_s"] / base["decode_tokens_per_s"]  # noqa: E731
    loss = lambda row: modes[row.name]["nll"] - base["nll"]  # noqa: E731
    strategies = [row for row in comparison.rows if row.mark is not None and row.mark.strategies_panel]
    fig, axes = plt.subplots(1, 2 if strategies else 1, figsize=(12 if strategies else 7.5, 6), squeeze=False)
    sweep_panel(axes[0, 0], result, comparison, loss, speed)
    if strategies:
        strategies_panel(axes[0, 1], result, strategies, comparison.river, loss, speed)
    fig.suptitle(f"River-LLM on {result['model']}, {result['machine']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def size_axis(ax, result):
    """The model-size panel's points (by parameter count), x values and titles."""
    named = sorted(result["shapes"].items(), key=lambda item: item[1]["parameters"])
    x = [row["parameters"] / 1e9 for _, row in named]
    for (name, row), xi in zip(named, x):
        ax.annotate(name, (xi, row["speedup"]), textcoords="offset points", xytext=(4, 6), fontsize=8)
    rows, source = [row for _, row in named], result["depth_source"]
    ax.set_xlabel("parameters (billions, log scale)")
    ax.set_title(f"against model size: seeded random weights, {rows[0]['context']}-token prompt,\n"
                 f"exits replayed from {source['model']} at tau {source['tau']:g}", fontsize=9)
    return rows, x, [f"{v:.2g}" for v in x]


def context_axis(ax, result):
    """The context-length panel's points, x values and titles."""
    rows = result["context_sweep"]
    x = [row["context"] for row in rows]
    ax.set_xlabel("context: prompt tokens before the decode (log scale)")
    ax.set_title(f"against context length: {result['model']},\n{result['text']}, its exit rule at tau "
                 f"{result['tau']:g}", fontsize=9)
    return rows, x, [str(v) for v in x]


def plot_scaling(result, path):
    """River's decode speedup over the backbone against model size (known shapes, random weights, replayed exits) and
    against context length (a real model and text), each measured beside the bandwidth model."""
    plt = pyplot()
    import matplotlib.ticker
    panels = [axis for key, axis in (("shapes", size_axis), ("context_sweep", context_axis)) if result.get(key)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, axis in zip(axes[0], panels):
        rows, x, ticks = axis(ax, result)
        ax.set_xscale("log")
        ax.set_xticks(x, ticks)  # the points measured, no others
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.plot(x, [row["speedup"] for row in rows], "o-", label="measured")
        ax.plot(x, [row["modelled"] for row in rows], "s--", label="bandwidth model (bytes read per token)")
        ax.axhline(1, color="k", lw=0.8)
        ax.set_ylabel("River decode speedup over the backbone")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"River-LLM: where the method pays ({result['machine']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
