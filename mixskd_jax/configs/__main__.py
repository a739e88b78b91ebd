"""python -m mixskd_jax.configs [NAME]: the file of config NAME (for --config=), or, without a
NAME, every config's name and file."""

import sys

from mixskd_jax import configs


def main(argv: list[str]) -> int:
  if len(argv) > 2:
    print("usage: python -m mixskd_jax.configs [NAME]", file=sys.stderr)
    return 2
  if len(argv) == 2:
    try:
      print(configs.path(argv[1]))
    except ValueError as e:
      print(e, file=sys.stderr)
      return 2
    return 0
  for name in configs.names():
    print(f"{name:28s} {configs.path(name)}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
