"""vqgan-train-prior RECIPE.yaml [key=value ...]: train a prior on token grids (vqgan.train_prior), one line per user error.

    vqgan-train-prior recipes/prior_quickstart.yaml train.steps=100
    accelerate launch --multi_gpu --num_processes 8 -m vqgan.cli.train_prior recipes/prior_imagenet256_transformer.yaml
"""

from __future__ import annotations

import sys

from vqgan.cli.errors import TRAINING_USER_ERRORS, run_command
from vqgan.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    def body(args: list[str]) -> int:
        from vqgan import train_prior  # here, so that --help and import errors stay cheap

        train_prior.main(args)
        return 0

    return run_command(body, argv, (ConfigError, *TRAINING_USER_ERRORS))


if __name__ == "__main__":
    sys.exit(main())
