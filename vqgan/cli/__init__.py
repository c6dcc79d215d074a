"""Console commands (pyproject.toml [project.scripts]); each module has `main(argv=None) -> int`.

Every command also runs as `python -m vqgan.cli.NAME` and under `accelerate launch -m vqgan.cli.NAME`.
A user's mistake (bad recipe, missing file, wrong option) prints one line `error: ...` and exits 2;
`--debug` or VQGAN_DEBUG=1 shows the traceback instead (vqgan/errors.py). Each command is a thin layer over
library functions; the library never imports this package (tests/test_layering.py).
"""
