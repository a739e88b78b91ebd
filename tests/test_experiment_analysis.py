"""The statistics of the comparison reports (experiments/analysis.py, experiments/tables.py)
against hand-computed values and scipy's own paired t-test."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from experiments import analysis, protocol, tables, transfer_fair, transfer_fair_report


def test_paired_difference_matches_scipy_and_hand_values():
  a = {0: 85.0, 1: 86.5, 2: 84.0, 7: 99.0}  # seed 7 has no partner: left out
  b = {0: 84.0, 1: 85.0, 2: 83.5}
  diff = analysis.paired_difference(a, b)
  d = np.array([1.0, 1.5, 0.5])
  assert diff["n"] == 3 and diff["wins"] == 3
  assert diff["mean"] == pytest.approx(1.0) and diff["sd"] == pytest.approx(0.5)
  expected = stats.ttest_rel([85.0, 86.5, 84.0], [84.0, 85.0, 83.5])
  assert diff["p"] == pytest.approx(expected.pvalue, rel=1e-12)
  # t = 1.0 / (0.5 / sqrt 3) = 3.464 on 2 degrees of freedom: p = 0.0742, not significant.
  assert diff["p"] == pytest.approx(0.07418, abs=1e-4) and not diff["significant"]
  half = stats.t.ppf(0.975, 2) * 0.5 / math.sqrt(3)  # 4.303 * 0.2887 = 1.242
  assert diff["ci95"] == pytest.approx((1.0 - half, 1.0 + half))
  assert half == pytest.approx(1.242, abs=1e-3)
  assert d.mean() == diff["mean"]


def test_paired_difference_edge_cases():
  assert analysis.paired_difference({0: 1.0}, {0: 2.0}) is None
  same = analysis.paired_difference({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})
  assert same["sd"] == 0.0 and same["p"] == 0.0 and same["significant"]
  equal = analysis.paired_difference({0: 2.0, 1: 3.0}, {0: 2.0, 1: 3.0})
  assert equal["p"] == 1.0 and not equal["significant"] and equal["wins"] == 0
  clear = analysis.paired_difference({0: 90.0, 1: 91.0, 2: 90.4}, {0: 85.0, 1: 85.9, 2: 85.5})
  assert clear["significant"] and clear["p"] < 0.001


def test_late_movement_uses_the_last_fifth_of_epochs():
  history = [{"epoch": e, "eval/top1/backbone": v}
             for e, v in [(4, 50.0), (28, 80.0), (32, 84.0), (36, 84.3), (40, 84.1)]]
  assert analysis.late_movement(history, 40) == pytest.approx(0.3)  # epochs 32, 36, 40
  assert analysis.late_movement(history[:3], 40) is None  # one evaluation at >= 32


def test_final_train_accuracy_averages_the_windows_after_the_step():
  history = [{"step": s, "train/accuracy/backbone": v}
             for s, v in [(15, 0.5), (30, 0.9), (45, 1.0), (60, 0.98)]]
  assert analysis.final_train_accuracy(history, after_step=30) == pytest.approx(99.0)
  assert analysis.final_train_accuracy(history, after_step=60) is None


def test_teacher_lead_and_the_epoch_it_leads_for_good():
  history = [{"epoch": e, "eval/top1/backbone": b, "eval/top1/self_teacher": t}
             for e, b, t in [(4, 50, 52), (8, 60, 59), (12, 70, 71), (16, 75, 77)]]
  lead = analysis.teacher_lead(history)
  assert lead == [(4, 2), (8, -1), (12, 1), (16, 2)]
  assert analysis.first_lead_epoch(lead) == 12
  assert analysis.first_lead_epoch([(4, 1.0), (8, -0.5)]) is None
  assert analysis.teacher_lead([{"epoch": 4, "eval/top1/backbone": 50}]) == []


def _rows(values):
  """name -> seed -> final top-1, as report.summarize shapes rows (other keys empty)."""
  return {name: {"seeds": {seed: {"final_top1": v, "train_accuracy_last_epoch": 100.0,
                                  "train_set_top1": 99.5,
                                  "late_movement": 0.2, "teacher_lead": [(4, -1.0), (8, 1.0)]}
                           for seed, v in per_seed.items()}}
          for name, per_seed in values.items()}


def test_ablation_and_comparison_tables_show_paired_differences():
  suite = protocol.get_suite("fashion_mnist_converged")
  rows = _rows({"mixskd_full": {0: 80.0, 1: 81.0, 2: 80.5},
                "full_without_kl": {0: 82.0, 1: 83.5, 2: 82.5},
                "cross_entropy": {0: 84.0, 1: 84.5, 2: 84.2}})
  ablation = tables.ablation_table(suite, rows)
  diff = analysis.paired_difference(rows_final(rows, "full_without_kl"),
                                    rows_final(rows, "mixskd_full"))
  assert f"| full_without_kl | 82.67 ± 0.76 | **{diff['mean']:+.2f}** |" in ablation
  assert "| full (all terms) | 80.50 ± 0.50 |" in ablation
  assert "| full_without_feature_mse | not run |" in ablation
  comparison = tables.comparison_table(suite, rows)
  ce = analysis.paired_difference(rows_final(rows, "mixskd_full"),
                                  rows_final(rows, "cross_entropy"))
  assert f"| mixskd_full | **{ce['mean']:+.2f}** |" in comparison and ce["significant"]
  assert "3/3" in comparison.split("method - mixskd_full")[1]  # cross-entropy above full
  convergence = tables.convergence_table(suite, rows)
  assert "| cross_entropy | 99.50 ± 0.00 (3) | 100.00 ± 0.00 (3) | 0.20 ± 0.00 (3) |" in convergence
  teacher = tables.teacher_table(suite, rows)
  assert "| mixskd_full | -1.00 ± 0.00 | 1.00 ± 0.00 | 8, 8, 8 |" in teacher


def rows_final(rows, name):
  return {s: v["final_top1"] for s, v in rows[name]["seeds"].items()}


def test_gate_history_reads_the_share_of_steps_and_the_lead():
  history = [{"step": 15, "train/accuracy/backbone": 0.5},  # a run without the gate's logs
             {"step": 30, "train/kl_gate_open": 0.2, "train/kl_gate/teacher_accuracy": 0.40,
              "train/kl_gate/backbone_accuracy": 0.45}]
  (epoch, share, lead), = analysis.gate_history(history, steps_per_epoch=15)
  assert epoch == 2 and share == pytest.approx(20.0) and lead == pytest.approx(-5.0)
  assert analysis.gate_history(history[:1], steps_per_epoch=15) == []


def test_gate_table_averages_each_span_per_seed_then_over_seeds():
  suite = protocol.get_suite("fashion_mnist_converged")  # 40 epochs: spans of 10
  rows = _rows({"full_kl_when_teacher_leads": {0: 84.0, 1: 84.5}, "mixskd_full": {0: 84.0}})
  # Seed 0: KL on 0% then 100% of the steps; seed 1: 50% throughout. Lead: +1 / +3 points.
  rows["full_kl_when_teacher_leads"]["seeds"][0]["kl_gate"] = [(5, 0.0, 1.0), (15, 100.0, 1.0)]
  rows["full_kl_when_teacher_leads"]["seeds"][1]["kl_gate"] = [(5, 50.0, 3.0), (15, 50.0, 3.0)]
  table = tables.gate_table(suite, rows)
  share = next(l for l in table.splitlines() if "KL on" in l)
  # epochs 0-10: mean(0, 50) = 25, sd 35.36; 10-20: mean(100, 50) = 75; all: 50 ± 0.
  assert "| 25.00 ± 35.36 | 75.00 ± 35.36 |  |  | 50.00 ± 0.00 |" in share
  lead = next(l for l in table.splitlines() if "teacher - backbone" in l)
  assert lead.endswith("| 2.00 ± 1.41 |") and "mixskd_full" not in table
  assert tables.gate_table(suite, _rows({"mixskd_full": {0: 84.0}})) == ""


def test_fair_transfer_report_by_hand(tmp_path):
  """The fair transfer tables from hand-written protocol results: mean ± sd over seeds, the
  paired difference to cross-entropy (mean and seeds won), the chosen settings and how many
  sat at an end of the grid, and the diagnosis columns' means."""
  suite = dataclasses.replace(protocol.get_suite("fashion_mnist_transfer_fair"),
                              methods=protocol.FAIR_TRANSFER_SOURCES[:1]
                              + tuple(m for m in protocol.FAIR_TRANSFER_SOURCES
                                      if m.name == "mixskd_full"))
  runs = protocol.suite_runs(suite)
  probe = {("cross_entropy", 0): 80.0, ("cross_entropy", 1): 82.0, ("cross_entropy", 2): 81.0,
           ("mixskd_full", 0): 78.0, ("mixskd_full", 1): 81.0, ("mixskd_full", 2): 78.5}
  for run in runs:
    key = (run.spec.name, run.seed)
    os.makedirs(transfer_fair.eval_dir(str(tmp_path), run))
    with open(tmp_path / run.name / "results.json", "w") as f:
      json.dump({"final": {"eval/top1/backbone": 86.0 + run.seed}}, f)
    grid = [{"bn": "source", "lr": lr, "val_metric": 0.0, "val_loss": 0.0} for lr in (0.1, 1.0)]
    scale = 2.0 if run.spec.name == "mixskd_full" else 1.0
    result = {"source": run.name, "tasks": {"linear_probe": {
        "metric": "top1", "grid": grid, "chosen": {"bn": "source", "lr": 1.0 if run.seed else 0.5},
        "test_metric": probe[key], "test_loss": 0.0, "train_metric": 100.0}},
        "diagnostics": {"weight_norm": {p: scale * (run.seed + 1) for p in
                                        ("stem", "layer1", "layer2", "layer3", "fc")},
                        "batchnorm": {p: {"max_var": 10.0 * scale, "mean_var": 1.0,
                                          "max_abs_mean": 0.0} for p in ("stem", "layer1")},
                        "feature_rms": {p: 1.0 for p in ("layer1", "layer2", "layer3",
                                                         "pooled")}}}
    with open(os.path.join(transfer_fair.eval_dir(str(tmp_path), run), "results.json"), "w") as f:
      json.dump(result, f)
  out = tmp_path / "report"
  out.mkdir()
  transfer_fair_report.write(suite, runs, str(tmp_path), str(out))
  table = (out / "transfer.md").read_text()
  # full - CE per seed: -2, -1, -2.5 -> mean -1.83, sd 0.76; CE wins all three.
  assert ("| mixskd_full | 87.00 ± 1.00 (3) | 79.17 ± 1.61 (3) | -1.83 (p " in table), table
  assert "0/3 seeds) | not run |  | not run |  |" in table
  assert "| cross_entropy | 87.00 ± 1.00 (3) | 81.00 ± 1.00 (3) |  | not run |" in table
  choices = (out / "choices.md").read_text()
  assert "| mixskd_full | source 0.5, source 1, source 1 | not run | not run |" in choices
  assert "linear_probe: 4 of 6" in choices  # lr 1.0 is the grid's top; 0.5 is not on it
  diagnosis = (out / "diagnosis.md").read_text()
  # weight norms 2 * (seed + 1) averaged over seeds 0-2 = 4; probe vs CE -1.83
  assert "| mixskd_full | 4 | 4 | 4 | 4 | 20 | 20 | 1 | 1 | 1 | 1 | -1.83 |  |  |" in diagnosis
