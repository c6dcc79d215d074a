"""vqgan-train-prior RECIPE.yaml [key=value ...]: train a prior on token grids (vqgan.train_prior), one line per user error.

    vqgan-train-prior recipes/prior_quickstart.yaml train.steps=100
    accelerate launch --multi_gpu --num_processes 8 -m vqgan.cli.train_prior recipes/prior_imagenet256_transformer.yaml
"""

from __future__ import annotations

import sys

from vqgan.errors import run_training


def main(argv: list[str] | None = None) -> int:
    def run(args: list[str]):
        from vqgan import train_prior  # here, so that --help and import errors stay cheap

        return train_prior.main(args)

    return run_training(run, argv)


if __name__ == "__main__":
    sys.exit(main())
