"""vqgan-train RECIPE.yaml [key=value ...]: train a VQGAN tokenizer (vqgan.train), one line per user error.

    vqgan-train recipes/quickstart.yaml train.steps=200
    accelerate launch --multi_gpu --num_processes 8 -m vqgan.cli.train recipes/imagenet256_f16_l2.yaml
"""

from __future__ import annotations

import sys

from vqgan.cli.errors import TRAINING_USER_ERRORS, run_command
from vqgan.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    def body(args: list[str]) -> int:
        from vqgan import train  # here, so that --help and import errors stay cheap

        train.main(args)
        return 0

    return run_command(body, argv, (ConfigError, *TRAINING_USER_ERRORS))


if __name__ == "__main__":
    sys.exit(main())
