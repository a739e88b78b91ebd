"""The benchmark's result (`bench.suite.run_benchmark`) as a plain-text table: the config and
the machine, the peak, one column per measured step with the ratio of the two, and the input
pipeline. `mixskd_jax.benchmark` re-exports `format_table`."""

from __future__ import annotations

from typing import Any


def _fmt(value, spec: str, unit: str = "") -> str:
  return "-" if value is None else f"{value:{spec}}{unit}"


def _fmt_bytes(n: int) -> str:
  return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _step_rows(s: dict) -> dict[str, str]:
  st = s.get("step_s")
  mem = s["memory"].get("peak_bytes")
  return {
      "compile: lower + XLA": f"{s['lower_s']:.1f} + {s['compile_s']:.1f} s",
      "step median [min, max]": (f"{st['median'] * 1e3:.0f} [{st['min'] * 1e3:.0f}, "
                                 f"{st['max'] * 1e3:.0f}] ms" if st else "-"),
      "clean images/s": _fmt(s.get("clean_images_per_s"), ".1f"),
      "GFLOP/step/device": _fmt((s["flops_per_step_per_device"] or 0) / 1e9 or None, ".1f"),
      "achieved GFLOP/s/device": _fmt(s.get("achieved_gflops_per_device"), ".1f"),
      "fraction of peak": _fmt(s.get("fraction_of_peak"), ".1%"),
      "peak memory/device": _fmt(None if mem is None else mem / 2 ** 30, ".2f", " GiB"),
      "communication/step/device": _fmt_bytes(s["communication"]["total_bytes"]),
  } | {f"  {kind}": f"{v['count']} x, {_fmt_bytes(v['bytes'])}"
       for kind, v in sorted(s["communication"]["by_kind"].items())}


def _title_lines(result: dict[str, Any]) -> list[str]:
  """The config, the machine and the peak, then a blank line."""
  m, c, p = result["machine"], result["config"], result["probe"]
  return [f"benchmark {result.get('label') or ''}: {c['data']} / {c['model']} / "
          f"{result['step']['method']} ({c['variant']}) / {c['dtype']} / batch "
          f"{c['batch_size']} clean per step, barrier={c['conv_input_barrier']}, "
          f"remat={c['remat_branches']}",
          f"machine: {m['devices']} x {m['device_kind']} ({m['platform']}), host "
          f"{m['host_cpu']}, {m['host_cores']} cores, jax {m['jax']}, load avg "
          f"{_fmt(m['load_average_1min'], '.2f')} -> "
          f"{_fmt(m.get('load_average_1min_end'), '.2f')}",
          f"peak: {result['peak']['gflops']:.0f} GFLOP/s/device ({result['peak']['source']}); "
          f"{p['dtype']} matmul probe {p['size']}^3 x{p['iterations']}: "
          f"{p['gflops']:.0f} GFLOP/s",
          ""]


def _step_table_lines(result: dict[str, Any]) -> list[str]:
  """The header and one row per measure, a column per step, then the ratio column."""
  cols = [(result["step"]["method"], _step_rows(result["step"]))]
  if "ce_step" in result:
    cols.append(("cross_entropy", _step_rows(result["ce_step"])))
  ratios = result.get("ratios", {})
  ratio_col = {"step median [min, max]": _fmt(ratios.get("step_time"), ".2f", "x"),
               "GFLOP/step/device": _fmt(ratios.get("flops"), ".2f", "x"),
               "clean images/s": ("time/FLOP " + _fmt(ratios.get("time_over_flop_ratio"), ".2f")
                                  if ratios else "")}
  width = max(len(k) for k in cols[0][1]) + 2
  header = "".join(f"{name:>24}" for name, _ in cols) + ("   ratio" if ratios else "")
  lines = [" " * width + header]
  rows = list(dict.fromkeys(row for _, col in cols for row in col))
  for row in rows:
    cells = "".join(f"{col.get(row, '-'):>24}" for _, col in cols)
    extra = f"   {ratio_col.get(row, '')}" if ratios else ""
    lines.append(f"{row:<{width}}{cells}{extra}".rstrip())
  return lines


def _pipeline_lines(pipe: dict[str, Any] | None) -> list[str]:
  """A blank line and the input pipeline's line; nothing when it was left out."""
  if pipe is None:
    return []
  if "unavailable" in pipe:
    return ["", f"input pipeline: unavailable: {pipe['unavailable']}"]
  mock = (f" (tfds mock data, {pipe['mock_examples']} images of the real shape)"
          if pipe.get("mock_examples") else "")
  return ["", f"input pipeline{mock}: {pipe['images_per_s']:.0f} images/s alone = "
              f"{_fmt(pipe.get('over_step_consumption'), '.1f', 'x')} what the step "
              "consumes"]


def format_table(result: dict[str, Any]) -> str:
  """The benchmark's results as a plain-text table."""
  lines = (_title_lines(result) + _step_table_lines(result)
           + _pipeline_lines(result.get("pipeline")))
  return "\n".join(lines)
