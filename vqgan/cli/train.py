"""vqgan-train RECIPE.yaml [key=value ...]: train a VQGAN tokenizer (vqgan.train), one line per user error.

    vqgan-train recipes/quickstart.yaml train.steps=200
    accelerate launch --multi_gpu --num_processes 8 -m vqgan.cli.train recipes/imagenet256_f16_l2.yaml
"""

from __future__ import annotations

import sys

from vqgan.errors import run_training


def main(argv: list[str] | None = None) -> int:
    def run(args: list[str]):
        from vqgan import train  # here, so that --help and import errors stay cheap

        return train.main(args)

    return run_training(run, argv)


if __name__ == "__main__":
    sys.exit(main())
