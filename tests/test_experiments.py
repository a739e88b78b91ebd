"""The comparison command: every suite's runs are valid configs, the runner trains what is not
finished and nothing else, and the report's numbers are the runs' numbers."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags
from absl.testing import flagsaver

from experiments import protocol, run as runner
from mixskd_jax import config as config_lib
from mixskd_jax.method import methods
from mixskd_jax.run.loop import train_and_evaluate


@pytest.mark.parametrize("suite", sorted(protocol.SUITES))
def test_every_run_of_every_suite_is_a_valid_config(suite):
  runs = protocol.suite_runs(protocol.get_suite(suite))
  names = [r.name for r in runs]
  assert len(names) == len(set(names))
  main_methods = {r.spec.method for r in runs if not r.ablation}
  if protocol.get_suite(suite).methods == protocol.MAIN_METHODS:
    assert main_methods == set(methods.METHODS)
  for r in runs:
    assert methods.check_config(r.config) == r.spec.method
    assert r.config.seed == r.seed
  variants = {r.spec.variant for r in runs if r.spec.method == "mixskd" and not r.ablation}
  if protocol.get_suite(suite).methods == protocol.MAIN_METHODS:
    assert variants == {"reference_cifar", "full", "adversarial"}


def test_ablations_remove_exactly_their_terms():
  suite = protocol.get_suite("fashion_mnist")
  runs = {r.spec.name: r.config for r in protocol.suite_runs(suite) if r.seed == 0}
  full = methods.objective_config(runs["mixskd_full"])
  for spec in suite.ablations:
    ablated = methods.objective_config(runs[spec.name])
    removed = {t for t, w in spec.weights}
    for term, weight in full.weights:
      assert ablated.weight(term) == (0.0 if term in removed else weight), (spec.name, term)


def test_fashion_mnist_protocol_is_shared_by_every_method():
  """Same data, model, epochs, schedule and batch for every row; only the method differs."""
  runs = protocol.suite_runs(protocol.get_suite("fashion_mnist"))
  shared = {(r.config.data.name, r.config.data.train_examples_per_class, r.config.data.test_examples,
             r.config.model.name, r.config.num_epochs, r.config.batch_size,
             r.config.optimizer.schedule, r.config.optimizer.learning_rate) for r in runs}
  assert shared == {("fashion_mnist", 500, None, "small_resnet", 8, 128, "cosine", 0.1)}
  assert protocol.get_suite("fashion_mnist").seeds == (0, 1, 2)


def test_cifar100_suite_is_the_papers_recipe():
  for r in protocol.suite_runs(protocol.get_suite("cifar100")):
    c = r.config
    assert (c.data.name, c.model.name, c.num_epochs, c.batch_size) == (
        "cifar100", "cifar_resnet18", 205, 64)
    assert c.optimizer.milestones == (100, 150) and c.optimizer.warmup_epochs == 5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cs_kd", "ps_kd"])
def test_cifar100_suite_methods_needing_the_pipeline_train_on_mock_data(name, tmp_path):
  """The CIFAR-100 rows that need same-class pairs or example ids, with the real ResNet-18."""
  run = next(r for r in protocol.suite_runs(protocol.get_suite("cifar100"))
             if r.spec.name == name)
  config = config_lib.finalize(run.config, "smoke")
  with tfds.testing.mock_data(num_examples=64):
    results = train_and_evaluate(config, str(tmp_path))
  assert results["finished"] and results["method"] == name


def test_apply_override_parses_by_field_type():
  config = config_lib.base_config()
  runner.apply_override(config, "batch_size=32")
  runner.apply_override(config, "optimizer.learning_rate=0.05")
  runner.apply_override(config, "data.augment=false")
  runner.apply_override(config, "data.data_dir=/data/tfds")
  assert (config.batch_size, config.optimizer.learning_rate, config.data.augment,
          config.data.data_dir) == (32, 0.05, False, "/data/tfds")
  with pytest.raises(ValueError, match="no field 'optimizer.lr'"):
    runner.apply_override(config, "optimizer.lr=1")
  with pytest.raises(ValueError, match="dotted.field=value"):
    runner.apply_override(config, "batch_size")


def test_unknown_rows_and_suites_are_refused():
  with pytest.raises(ValueError, match="unknown rows"):
    runner.selected_runs(protocol.get_suite("smoke"), None, ["mixskd_fll"], True)
  with pytest.raises(ValueError, match="--suite='cifar10' is unknown"):
    protocol.get_suite("cifar10")


def _timing(workdir, name):
  with open(os.path.join(workdir, name, runner.TIMING_FILE)) as f:
    return json.load(f)


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_mnist_offline")
def test_command_trains_reports_and_skips_finished_runs(tmp_path):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  workdir, results = str(tmp_path / "runs"), str(tmp_path / "results")
  args = dict(suite="smoke", workdir=workdir, results_dir=results, seeds=["0", "1"],
              methods=["cross_entropy", "mixskd_full", "full_without_kl"], time_steps=2,
              time_warmup=1)
  with flagsaver.flagsaver(**args):
    runner.main(["run"])
  suite = protocol.get_suite("smoke")
  runs = runner.selected_runs(dataclasses.replace(suite, seeds=(0, 1)), None,
                              args["methods"], True)
  assert [r.name for r in runs] == ["cross_entropy/seed0", "cross_entropy/seed1",
                                    "mixskd_full/seed0", "mixskd_full/seed1",
                                    "full_without_kl/seed0"]
  finals = {}
  for r in runs:
    with open(os.path.join(workdir, r.name, "results.json")) as f:
      res = json.load(f)
    assert res["finished"] and res["train_step_time_s"] > 0
    assert len(res["calibration"]["count"]) == 15 and sum(res["calibration"]["count"]) == 60
    finals[r.name] = res["final"]["eval/top1/backbone"]
    assert len(_timing(workdir, r.name)["invocations"]) == 1

  with open(os.path.join(results, "summary.json")) as f:
    summary = json.load(f)
  row = summary["rows"]["cross_entropy"]
  ce = [finals["cross_entropy/seed0"], finals["cross_entropy/seed1"]]
  np.testing.assert_allclose(row["final_top1_mean"], np.mean(ce))
  np.testing.assert_allclose(row["final_top1_std"], np.std(ce, ddof=1))
  assert row["cost_vs_cross_entropy"] == 1.0 and row["step_time_source"] == "timing phase"
  timings = summary["step_timing"]
  assert set(timings) == {"cross_entropy", "mixskd_full"}  # main-table rows only
  assert timings["mixskd_full"]["steps"] == 2
  np.testing.assert_allclose(summary["rows"]["mixskd_full"]["cost_vs_cross_entropy"],
                             timings["mixskd_full"]["median_s"] / timings["cross_entropy"]["median_s"])
  with open(os.path.join(results, "table.md")) as f:
    table = f.read()
  assert f"| cross_entropy | {np.mean(ce):.2f} ± {np.std(ce, ddof=1):.2f} | 2 |" in table
  assert "| label_smoothing | not run |" in table
  with open(os.path.join(results, "ablation.md")) as f:
    ablation = f.read()
  delta = finals["full_without_kl/seed0"] - finals["mixskd_full/seed0"]
  assert f"| full_without_kl | {finals['full_without_kl/seed0']:.2f} | {delta:+.2f} |" in ablation
  for png in ("accuracy_vs_epoch.png", "mixskd_heads.png", "mixskd_loss_terms.png",
              "reliability.png"):
    with open(os.path.join(results, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(results, "RUN.md")) as f:
    record = f.read()
  assert "python -m experiments.run" in record and "- jax " in record
  assert "Runs finished: 5 of 5" in record

  # Again: everything finished, so nothing trains; an unfinished run is trained (resumed).
  os.remove(os.path.join(workdir, "cross_entropy/seed1", "results.json"))
  with flagsaver.flagsaver(**args):
    runner.main(["run"])
  assert len(_timing(workdir, "cross_entropy/seed0")["invocations"]) == 1
  assert len(_timing(workdir, "cross_entropy/seed1")["invocations"]) == 2


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_mnist_offline")
def test_transfer_command_pretrains_then_probes_and_fine_tunes_from_it(tmp_path):
  """The transfer suite's runner: each downstream row starts from its pre-training's backbone
  (same seed); the probe leaves that backbone bit-identical; the table shows the rows."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  workdir, results = str(tmp_path / "runs"), str(tmp_path / "results")
  methods = ["pretrain_cross_entropy", "probe_cross_entropy", "finetune_cross_entropy"]
  with flagsaver.flagsaver(suite="transfer_smoke", workdir=workdir, results_dir=results,
                           seeds=["0"], methods=methods, time_steps=0):
    assert runner.main(["run"]) == 0
  from mixskd_jax.interop import pretrained
  source = pretrained.load_trained(os.path.join(workdir, "pretrain_cross_entropy", "seed0"))
  probe = pretrained.load_trained(os.path.join(workdir, "probe_cross_entropy", "seed0"))
  tuned = pretrained.load_trained(os.path.join(workdir, "finetune_cross_entropy", "seed0"))
  assert source.num_classes == probe.num_classes == 5
  for collection in ("params", "batch_stats"):
    for name, tree in source.variables[collection].items():
      if name == "fc":
        continue
      jax_equal = jax.tree_util.tree_map(np.array_equal, tree,
                                         probe.variables[collection][name])
      assert all(jax.tree_util.tree_leaves(jax_equal)), (collection, name)
  assert not np.array_equal(source.variables["params"]["stem"]["conv1"]["kernel"],
                            tuned.variables["params"]["stem"]["conv1"]["kernel"])
  with open(os.path.join(workdir, "probe_cross_entropy", "seed0", "results.json")) as f:
    probe_top1 = json.load(f)["final"]["eval/top1/backbone"]
  with open(os.path.join(results, "transfer.md")) as f:
    table = f.read()
  assert f"| cross_entropy | " in table and f"{probe_top1:.2f}" in table
  with open(os.path.join(results, "transfer.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_mnist_offline")
def test_fair_transfer_command_pretrains_then_runs_the_protocol_on_each(tmp_path):
  """The fair transfer suite's runner: pre-training, then the protocol (suite overrides plus
  --transfer_set) on each backbone into <run>/transfer/, then the report's tables."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  workdir, results = str(tmp_path / "runs"), str(tmp_path / "results")
  with flagsaver.flagsaver(suite="transfer_fair_smoke", workdir=workdir, results_dir=results,
                           seeds=["0"], methods=["cross_entropy"], time_steps=0,
                           transfer_set=["segmentation.decoder_width=4"]):
    assert runner.main(["run"]) == 0
  for source in ("cross_entropy",):
    with open(os.path.join(workdir, source, "seed0", "transfer", "results.json")) as f:
      tasks = json.load(f)["tasks"]
    assert [(g["bn"], g["lr"]) for g in tasks["fine_tune"]["grid"]] == [
        (bn, lr) for bn in ("source", "reestimated", "batch") for lr in (0.01, 0.1)]
    with open(os.path.join(workdir, source, "seed0", "transfer", "segmentation.json")) as f:
      assert len(json.load(f)["grid"]) == 4
    with open(os.path.join(results, "transfer.md")) as f:
      assert f"| {source} | " in f.read()
  with open(os.path.join(results, "RUN.md")) as f:
    assert "Transfer protocol: 1 backbone(s) evaluated" in f.read()


RESULTS = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "results")
README_NAMES = {"cross_entropy": "cross-entropy", "label_smoothing": "label smoothing",
                "mixup": "mixup", "cutmix": "CutMix", "cs_kd": "CS-KD", "ps_kd": "PS-KD",
                "byot": "BYOT", "mixskd_reference_cifar": "MixSKD `reference_cifar`",
                "mixskd_full": "MixSKD `full`", "mixskd_adversarial": "MixSKD `adversarial`"}


def _rows(markdown):
  """First cell -> the other cells (bold marks removed) of every table row."""
  rows = {}
  for line in markdown.splitlines():
    if line.startswith("|") and not line.startswith("|---"):
      cells = [c.strip().replace("**", "") for c in line.strip("|").split("|")]
      rows[cells[0]] = cells[1:]
  return rows


def _section(text, heading):
  """The markdown after `heading` up to the next heading of any level."""
  return text.split(heading, 1)[1].split("\n#", 1)[0]


@pytest.mark.parametrize("suite,heading", [
    ("fashion_mnist_converged", "### Main table (`fashion_mnist_converged/table.md`)"),
    ("fashion_mnist", "### Short-schedule main table (`fashion_mnist/table.md`)")])
def test_committed_results_readme_quotes_the_committed_tables(suite, heading):
  """experiments/results/README.md repeats each suite's table.md exactly (seeds column
  dropped)."""
  with open(os.path.join(RESULTS, "README.md")) as f:
    readme = _rows(_section(f.read(), heading))
  with open(os.path.join(RESULTS, suite, "table.md")) as f:
    table = _rows(f.read())
  for name, shown in README_NAMES.items():
    top1, _, best, heads, ece, step, cost = table[name]
    assert readme[shown] == [top1, best, heads, ece, step, cost], name


def test_committed_results_readme_quotes_the_paired_comparisons_and_ablation():
  """The converged suite's paired comparisons, convergence table, ablation, the ablation rows'
  teacher leads and the gate table appear verbatim; the short-schedule ablation's numbers are
  the ones in fashion_mnist/ablation.md."""
  with open(os.path.join(RESULTS, "README.md")) as f:
    text = f.read()
  for name in ("comparisons.md", "convergence.md"):  # the main-table rows (not ablations')
    with open(os.path.join(RESULTS, "fashion_mnist_converged", name)) as f:
      lines = [l for l in f.read().splitlines()
               if l.startswith("| ") and l.split("|")[1].strip() in README_NAMES]
    assert len(lines) >= 10 and all(l in text for l in lines), name
  for name, prefix in (("ablation.md", "| "), ("gate.md", "| "), ("teacher.md", "| full_")):
    with open(os.path.join(RESULTS, "fashion_mnist_converged", name)) as f:
      lines = [l for l in f.read().splitlines() if l.startswith(prefix)]
    assert len(lines) >= 3 and all(l in text for l in lines), name
  readme_ablation = _rows(_section(text, "### Short-schedule ablation of MixSKD `full`"))
  with open(os.path.join(RESULTS, "fashion_mnist", "ablation.md")) as f:
    ablation = _rows(f.read())
  values = [cells[0] for name, cells in ablation.items() if name.startswith("full")]
  readme_values = [cells[0] for name, cells in readme_ablation.items()
                   if name == "all terms" or name.startswith("without")]
  assert values == readme_values


def test_a_preempted_run_ends_the_command(tmp_path, monkeypatch):
  """SIGTERM during a run saves it and stops the command (status 75): the signal is meant for
  the whole command, so the next runs must not start (a restarted command would race them)."""
  from mixskd_jax.run import loop
  runs = runner.training_order(protocol.suite_runs(protocol.get_suite("smoke"),
                                                   ablations=False))[:3]
  trained = []

  def fake_train(config, workdir):
    os.makedirs(workdir, exist_ok=True)
    trained.append(workdir)
    return {"finished": False, "preempted": len(trained) == 2, "steps_this_run": 1,
            "step": 1, "num_steps": 2}

  monkeypatch.setattr(loop, "train_and_evaluate", fake_train)
  monkeypatch.setattr(runner.progress, "one_line_summary", lambda results: "")
  assert runner.train_all(runs, str(tmp_path)) is False
  assert trained == [str(tmp_path / r.name) for r in runs[:2]]
  def finishing_train(config, workdir):
    os.makedirs(workdir, exist_ok=True)
    return {"finished": True, "preempted": False}

  monkeypatch.setattr(loop, "train_and_evaluate", finishing_train)
  assert runner.train_all(runs, str(tmp_path)) is True


def test_committed_results_readme_quotes_the_fair_transfer_tables():
  """Every row of the fair transfer suite's transfer.md and diagnosis.md appears verbatim in
  the results README, and the table covers the suite's sources."""
  with open(os.path.join(RESULTS, "README.md")) as f:
    text = f.read()
  folder = os.path.join(RESULTS, "fashion_mnist_transfer_fair")
  for name in ("transfer.md", "diagnosis.md"):
    with open(os.path.join(folder, name)) as f:
      rows = [l for l in f.read().splitlines() if l.startswith("| ") and "---" not in l]
    assert len(rows) >= 2, name
    missing = [l for l in rows if l not in text]
    assert not missing, (name, missing[:2])
  with open(os.path.join(folder, "transfer.md")) as f:
    shown = {l.split("|")[1].strip() for l in f.read().splitlines() if l.startswith("| ")}
  assert {"cross_entropy", "mixskd_full", "full_unit_pooled_discriminator"} <= shown
