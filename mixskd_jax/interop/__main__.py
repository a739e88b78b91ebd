"""Move MixSKD models between PyTorch and JAX.

Import an official MixSKD PyTorch checkpoint (or an .npz state dict) as a Flax/Orbax one
(`import-torch` may be left out; old command lines work unchanged):

  python -m mixskd_jax.interop [import-torch] --checkpoint resnet18.pth.tar \
      --model cifar_resnet18 --num_classes 100 --output /tmp/mixskd_r18 [--backbone_only]

The output directory holds `variables/` (Orbax) and `model.json`; load it with
`mixskd_jax.interop.load_converted(output)`. Refused inputs (a --num_classes below 1, weights
that are NaN or infinite) write nothing and end with one line on stderr and exit status 2.

Export a trained ResNet's backbone (or the whole MixSKD network) as a PyTorch state dict,
for torchvision / mmdetection / detectron2 (`python -m mixskd_jax.interop export-torch -h`):

  python -m mixskd_jax.interop export-torch --from WORKDIR --output r50.safetensors \
      [--format safetensors|pt] [--layout auto|torchvision|official] [--no_head] \
      [--whole_mixskd]

--from is a training workdir (its newest checkpoint), one `<workdir>/checkpoints/<step>`
directory, or a directory the import wrote. Bad input (no such --from, a model with no torch
layout, an existing --output) writes nothing: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

from mixskd_jax import backends
from mixskd_jax.interop import export
from mixskd_jax.interop.checkpoint_io import read_state_dict, save_converted
from mixskd_jax.interop.convert import ConversionRefused, convert_state_dict, export_backbone
from mixskd_jax.interop.pretrained import PretrainedError, load_trained
from mixskd_jax.models.registry import RESNETS, build_model

EXPORT, IMPORT = "export-torch", "import-torch"


def parse_args(argv: list[str]) -> argparse.Namespace:
  """The import's flags (with or without the `import-torch` subcommand)."""
  parser = argparse.ArgumentParser(prog="python -m mixskd_jax.interop", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help=".pth/.pth.tar/.pt or .npz file")
  parser.add_argument("--model", required=True, choices=sorted(RESNETS))
  parser.add_argument("--num_classes", required=True, type=int)
  parser.add_argument("--output", required=True, help="new directory to write")
  parser.add_argument("--plain", action="store_true",
                      help="the file is a plain backbone (torchvision key layout), not MixSKD")
  parser.add_argument("--backbone_only", action="store_true",
                      help="keep only the backbone (inference/transfer model)")
  parser.add_argument("--discriminator_seed", type=int, default=0,
                      help="seed of the random discriminators that official files lack")
  return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
  """Refuses arguments that would fail later (num_classes 0: a ZeroDivisionError in the model's
  initializer), before the checkpoint is read."""
  if args.num_classes < 1:
    raise ConversionRefused(f"--num_classes {args.num_classes}: must be >= 1, the number of "
                            "classes the checkpoint's classifiers output (100 for CIFAR-100).")


class _OneLineParser(argparse.ArgumentParser):
  """argparse, with a usage error as one line on stderr (exit status 2, as argparse's)."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: {message}; see --help.\n")


def parse_export_args(argv: list[str]) -> argparse.Namespace:
  """The flags of `export-torch`."""
  parser = _OneLineParser(
      prog=f"python -m mixskd_jax.interop {EXPORT}",
      description="Write a trained ResNet as a PyTorch state dict (see docs/checkpoints.md, "
                  "'Using a trained backbone in PyTorch').")
  parser.add_argument("--from", dest="source", metavar="PATH", required=True,
                      help="training workdir, <workdir>/checkpoints/<step>, or a directory "
                           "the import wrote")
  parser.add_argument("--output", metavar="FILE", required=True,
                      help="new file to write (never overwritten)")
  parser.add_argument("--format", default="safetensors", choices=export.FORMATS,
                      help="safetensors (default, needs no torch) or pt (torch.save of a dict "
                           "of tensors, e.g. for mmdetection)")
  parser.add_argument("--layout", default="auto", choices=export.LAYOUTS,
                      help="auto: torchvision for imagenet_resnet50, official otherwise")
  parser.add_argument("--no_head", action="store_true",
                      help="drop the classifier fc (detection/segmentation backbones)")
  parser.add_argument("--whole_mixskd", action="store_true",
                      help="the whole MixSKD network in the official layout, not its backbone")
  return parser.parse_args(argv)


def export_main(argv: list[str]) -> str:
  """`export-torch`: reads `--from`, writes `--output`; returns the file written.

  Raises:
    ConversionRefused: any bad input (one line); nothing is written.
  """
  args = parse_export_args(argv)
  output = os.path.abspath(args.output)
  if os.path.exists(output):  # checked first: reading a large checkpoint for nothing is slow
    raise export.ExportRefused(f"--output {output} already exists; choose another file or "
                               "delete it first (it is never overwritten).")
  if args.format == "pt":
    try:
      export.import_torch_for_pt()
    except ImportError as e:
      raise export.ExportRefused(str(e)) from e
  try:
    trained = load_trained(args.source)
  except PretrainedError as e:
    raise export.ExportRefused(f"--from: {e}") from e
  layout = export.resolve_layout(trained.model_name, args.layout,
                                 whole_mixskd=args.whole_mixskd)
  state = export.torch_state_dict(trained.variables, trained.model_name, layout=layout,
                                  head=not args.no_head, whole_mixskd=args.whole_mixskd)
  meta = export.metadata(model_name=trained.model_name, num_classes=trained.num_classes,
                         layout=layout, source=trained.source, head=not args.no_head,
                         whole_mixskd=args.whole_mixskd)
  out = export.save(output, state, fmt=args.format, meta=meta)
  what = "MixSKD network" if args.whole_mixskd else "backbone" + ("" if args.no_head
                                                                   else " with its head")
  print(f"Wrote {trained.model_name} {what} ({len(state)} tensors, {layout} layout, "
        f"{trained.num_classes} classes) as {args.format} to {out}")
  return out


def import_main(argv: list[str]) -> str:
  """Converts as the command line says; returns the directory written.

  Raises:
    ConversionRefused: bad arguments or non-finite weights; nothing is written.
  """
  args = parse_args(argv)
  check_args(args)
  mixskd = not args.plain
  model = build_model(args.model, args.num_classes, mixskd=mixskd)
  variables = convert_state_dict(read_state_dict(args.checkpoint), model,
                                 discriminator_key=jax.random.key(args.discriminator_seed))
  if args.backbone_only and mixskd:
    variables, mixskd = export_backbone(variables), False
  out = save_converted(args.output, variables, model_name=args.model,
                       num_classes=args.num_classes, mixskd=mixskd, source=args.checkpoint)
  print(f"Wrote {'MixSKD' if mixskd else 'backbone'} {args.model} ({args.num_classes} classes) "
        f"to {out}")
  return out


def main(argv: list[str] | None = None) -> str:
  """Runs `export-torch`, or the import (`import-torch`, or no subcommand: the original
  command line); returns what was written.

  Raises:
    ConversionRefused: bad input; nothing is written.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == [EXPORT]:
    return export_main(argv[1:])
  return import_main(argv[1:] if argv[:1] == [IMPORT] else argv)


def run() -> int:
  """The command: `main`, with a refusal as one line on stderr and exit status 2."""
  backends.start()  # before the first key or array: no libtpu lines on a CPU host
  try:
    main()
  except ConversionRefused as e:
    print(e, file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(run())
