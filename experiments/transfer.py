"""The transfer suite's report: how well each pre-training's backbone serves a new task from
few labels, as a linear probe (frozen backbone) and fine-tuned, against training from scratch.

Rows of `report.summarize` named by experiments.protocol.transfer_rows: `pretrain_<m>`,
`probe_<m>`, `finetune_<m>` and `scratch`.
"""

from __future__ import annotations

import os
import numpy as np

from experiments import analysis, protocol, tables

MODES = (("probe", "linear probe"), ("finetune", "fine-tuned"))


def _pretrainings(suite: protocol.Suite) -> list[str]:
  return [s.name[len("pretrain_"):] for s in suite.methods if s.name.startswith("pretrain_")]


def transfer_table(suite: protocol.Suite, rows: dict) -> str:
  """Per pre-training: its own test top-1 (classes 0-4), then the downstream test top-1
  (classes 5-9) of the probe and the fine-tuned network, mean ± sd over seeds, and each one's
  paired difference to the cross-entropy pre-training (bold: p < 0.05)."""
  lines = ["| pre-training | its top-1 % (classes 0-4) | linear probe top-1 % | vs CE "
           "pre-training | fine-tuned top-1 % | vs CE pre-training |", "|---|---|---|---|---|---|"]
  scratch = tables.final_top1(rows, "scratch")
  if scratch:
    lines.append(f"| none (trained from scratch on the 250 images) | | | | "
                 f"{tables.fmt(*tables.mean_std(list(scratch.values())))} | |")
  for name in _pretrainings(suite):
    own = tables.final_top1(rows, f"pretrain_{name}")
    cells = [tables.fmt(*tables.mean_std(list(own.values()))) if own else "not run"]
    for prefix, _ in MODES:
      values = tables.final_top1(rows, f"{prefix}_{name}")
      cells.append(tables.fmt(*tables.mean_std(list(values.values()))) if values else "not run")
      diff = (analysis.paired_difference(values, tables.final_top1(rows, f"{prefix}_cross_entropy"))
              if name != "cross_entropy" else None)
      if diff is None:
        cells.append("")
      else:
        mark = "**" if diff["significant"] else ""
        cells.append(f"{mark}{diff['mean']:+.2f}{mark} (p {diff['p']:.3f}, "
                     f"{diff['wins']}/{diff['n']} seeds)")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return ("Downstream: test top-1 on the 5,000 test images of classes 5-9 after the last "
          "epoch. Seed k of every downstream row starts from seed k of its pre-training.\n\n"
          + "\n".join(lines) + "\n")


def transfer_plot(suite: protocol.Suite, rows: dict, out: str) -> str | None:
  """Grouped bars (mean over seeds, error bar = sd, dots = seeds) per pre-training and mode."""
  final = lambda row: tables.final_top1(rows, row)
  names = [n for n in _pretrainings(suite) if any(final(f"{p}_{n}") for p, _ in MODES)]
  if not names:
    return None
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4.5))
  width = 0.38
  x = np.arange(len(names))
  for i, (prefix, label) in enumerate(MODES):
    values = [list(tables.final_top1(rows, f"{prefix}_{n}").values()) for n in names]
    means = [np.mean(v) if v else np.nan for v in values]
    sds = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values]
    ax.bar(x + (i - 0.5) * width, means, width, yerr=sds, capsize=4, label=label, alpha=0.8)
    for j, v in enumerate(values):
      ax.plot([x[j] + (i - 0.5) * width] * len(v), v, "k.", markersize=4)
  scratch = list(tables.final_top1(rows, "scratch").values())
  if scratch:
    ax.axhline(np.mean(scratch), color="gray", linestyle="--",
               label=f"from scratch ({np.mean(scratch):.1f}%)")
  finite = [v for n in names for p, _ in MODES for v in final(f"{p}_{n}").values()]
  finite += scratch
  ax.set_ylim(min(finite) - 3, max(finite) + 2)
  ax.set_xticks(x, [f"pre-trained with\n{n}" for n in names])
  ax.set(ylabel="test top-1 %, classes 5-9", title="Transfer from classes 0-4 to 5-9, "
         "50 labels/class (mean ± sd, dots: seeds)")
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(os.path.join(out, "transfer.png"), dpi=110)
  plt.close(fig)
  return "transfer.png"


def write(suite: protocol.Suite, rows: dict, results_dir: str) -> list[str]:
  """Writes transfer.md and transfer.png; returns the plots written."""
  with open(os.path.join(results_dir, "transfer.md"), "w") as f:
    f.write(f"# {suite.description}\n\n{transfer_table(suite, rows)}")
  plot = transfer_plot(suite, rows, results_dir)
  return [plot] if plot else []
