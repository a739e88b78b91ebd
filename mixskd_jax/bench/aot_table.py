"""Text of `python -m mixskd_jax.aot`: a slice report (`aot.compile_for_slice`) and a fit
(`aot_fit.fit_report`), and the one line for a step that does not fit."""

from __future__ import annotations

from typing import Any

GIB = 2 ** 30


def _gib(value: int | None) -> str:
  return "-" if value is None else f"{value / GIB:.2f} GiB"


def _header(r: dict[str, Any], label: str) -> list[str]:
  return [
      f"aot {label or r['model']} on {r['topology']}: {r['devices']} x {r['device_kind']}, "
      f"{r['processes']} process(es), {r['slices']} slice(s); jax {r['jax']}, libtpu "
      f"{r['libtpu']}",
      f"run: {r['method']} / {r['model']} / {r['dtype']} / {r['per_device_batch_size']} per "
      f"chip, global batch {r['global_batch_size']}, lr {r['learning_rate']:g}, mix groups "
      f"{r['mix_groups']}, BatchNorm groups {r['batchnorm_groups']}, remat_branches "
      f"{r['remat_branches']}",
      f"usable HBM per chip (the compiler's): {_gib(r['hbm_usable_bytes_per_device'])} "
      f"(datasheet {_gib(r['hbm_datasheet_bytes_per_device'])})"]


def _fits(step: dict[str, Any]) -> str:
  headroom = step.get("headroom_bytes")
  if step["fits"]:
    return "yes" if headroom is None else f"yes, {_gib(headroom)} free"
  return "NO" + ("" if headroom is None else f": over by {_gib(-headroom)}")


def _collectives(step: dict[str, Any]) -> str:
  by_kind = step.get("communication", {}).get("by_kind", {})
  if not by_kind:
    return "none" if "communication" in step else "-"
  return "; ".join(f"{kind} x{v['count']} {v['bytes'] / 1e6:.1f} MB"
                   for kind, v in sorted(by_kind.items()))


def _rows(step: dict[str, Any]) -> list[tuple[str, str]]:
  memory = step.get("memory", {})
  oom = step.get("out_of_memory")
  flops = step.get("flops_per_step_per_device")
  cost = step.get("cost_model_seconds")
  moved = step.get("communication", {}).get("data_moving_bytes")
  return [
      ("HBM arguments", _gib(memory.get("argument_size_in_bytes"))),
      ("HBM outputs", _gib(memory.get("output_size_in_bytes"))),
      ("  donated (aliased)", _gib(memory.get("alias_size_in_bytes"))),
      ("HBM temporaries", _gib(memory.get("temp_size_in_bytes"))),
      ("HBM peak (compiler)", _gib(step.get("peak_bytes")) if not oom else
       f"needs {_gib(oom['needed_bytes'])}"),
      ("  args+outs-donated+temps", _gib(memory.get("peak_bytes"))),
      ("fits the chip", _fits(step)),
      ("GFLOP / step", "-" if flops is None else f"{flops / 1e9:,.1f}"),
      ("cost model step time", "not available" if cost is None else f"{cost * 1e3:.1f} ms"),
      ("collectives", _collectives(step)),
      ("activation bytes moved", "-" if moved is None else f"{moved}"),
      ("compile: lower + TPU", f"{step['lower_s']:.1f} + {step['compile_s']:.1f} s"),
  ]


def format_report(r: dict[str, Any], label: str = "") -> str:
  """The slice report as a table: one column per compiled step."""
  steps = [(name, r[key]) for name, key in (("train step", "train_step"),
                                            ("eval step", "eval_step")) if key in r]
  columns = [dict(_rows(step)) for _, step in steps]
  names = [name for name, _ in _rows(steps[0][1])]
  width = max(len(n) for n in names) + 2
  cells = [[c[n] for c in columns] for n in names]
  col = max(max(len(v) for row in cells for v in row), 12) + 2
  lines = _header(r, label) + [""]
  lines.append(" " * width + "".join(f"{name:>{col}}" for name, _ in steps))
  for name, row in zip(names, cells):
    lines.append(f"{name:<{width}}" + "".join(f"{v:>{col}}" for v in row))
  oom = r["train_step"].get("out_of_memory")
  if oom:
    lines += ["", f"compiler: {oom['message']}"]
  return "\n".join(lines)


def does_not_fit_line(r: dict[str, Any]) -> str:
  """One line for a train step that does not fit, with what to try."""
  step = r["train_step"]
  needed = step.get("out_of_memory", {}).get("needed_bytes")
  usable = r["hbm_usable_bytes_per_device"]
  per_chip = r["per_device_batch_size"]
  tries = []
  if needed:
    # Memory grows about linearly with the batch and has a fixed part, so scaling the batch
    # by usable / needed errs on the safe side.
    tries.append(f"per_device_batch_size <= {max(per_chip * usable // needed, 1)}")
  if r["dtype"] != "bfloat16":
    tries.append("model.dtype=bfloat16")
  need = f"needs {_gib(needed)} per chip" if needed else "does not fit"
  return (f"the train step on {r['topology']} at {per_chip} per chip {need}, the chip has "
          f"{_gib(usable)}; try {' or '.join(tries + ['--fit'])} (--fit: the largest "
          "per-chip batch that fits)")


def largest_cell(largest: int | None, boundary_found: bool) -> str:
  """The largest batch found, as `>= N` where the search stopped before the boundary."""
  if largest is None:
    return "none"
  return str(largest) if boundary_found else f">= {largest}"


def format_fit(result: dict[str, Any], label: str = "") -> str:
  """The fit as a table: one row per (dtype, remat) with the largest per-chip batch."""
  lines = [f"fit {label or result['model']} on {result['topology']}: {result['devices']} x "
           f"{result['device_kind']}, usable HBM per chip {_gib(result['hbm_usable_bytes'])}",
           f"(per-chip batches in steps of {result['granularity']}; learning rate from the "
           "config's scaling rule)", ""]
  header = (f"{'dtype':<10}{'remat':>7}{'largest per chip':>18}{'peak HBM':>12}"
            f"{'global batch':>14}{'lr':>10}{'compiles':>10}{'compiling':>11}")
  lines.append(header)
  for row in result["rows"]:
    largest = row["largest_per_device_batch"]
    lines.append(
        f"{row['dtype']:<10}{str(row['remat_branches']):>7}"
        f"{largest_cell(largest, row.get('boundary_found', True)):>18}"
        f"{_gib(row.get('peak_bytes')):>12}"
        f"{row.get('global_batch_size') or '-':>14}"
        f"{'-' if row.get('learning_rate') is None else format(row['learning_rate'], 'g'):>10}"
        f"{row['compiles']:>10}{row.get('compile_seconds', row['seconds']):>10.0f}s")
  return "\n".join(lines)
