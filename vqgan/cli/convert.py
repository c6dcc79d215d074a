"""Convert a released tokenizer checkpoint into a vqgan tokenizer folder (config.json + model.safetensors).

    vqgan-convert last.ckpt out/taming_f16 --from taming --config model.yaml
    vqgan-convert ibq_16384.ckpt out/ibq --from ibq                 # EMA weights when present
    vqgan-convert vq_ds16_c2i.pt out/llamagen_vq16 --from llamagen
    vqgan-convert path/to/diffusers_vqmodel out/amused --from diffusers
    vqgan-convert vae_ch160v4096z32.pth out/var_vae --from var      # VAR's multi-scale tokenizer -> kind msvq
    vqgan-convert vae.pth out/var_vae --from var --config args.json  # other patch_nums / quant_resi / beta

Pickled checkpoints are read with a safe reader (tensors and a short allowlist; anything else is refused).
The folder loads with VQTokenizer.from_pretrained, evaluates with vqgan-evaluate / vqgan-fid recon:, and
starts a fine-tune with model.init_from=OUT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vqgan.errors import CommandParser, add_debug_flag, run_command


def run(argv: list[str] | None = None) -> int:
    from vqgan.convert import SOURCES

    parser = CommandParser(prog="vqgan-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="checkpoint file (.ckpt / .pt / .safetensors) or a diffusers folder")
    parser.add_argument("out_dir", type=Path, help="tokenizer folder to write (replaced atomically if it exists)")
    parser.add_argument("--from", dest="kind", required=True, choices=sorted(SOURCES), help="the source's project")
    parser.add_argument("--config", type=Path,
                        help="taming / ibq: the model.yaml (checked against the weights; shapes are read off the "
                             "weights without it); llamagen: its model-args JSON; var: a JSON of VAR's arguments "
                             "(patch_nums, quant_resi, beta, share_quant_resi; VAR's defaults without it)")
    parser.add_argument("--resolution", type=int, help="nominal image size that places attention (default: the "
                        "yaml's; var: the last scale's side x f; else 256)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                        help="ibq / taming / llamagen: convert the EMA weights (default: ibq and llamagen use them "
                             "when the checkpoint has them)")
    parser.add_argument("--keep-discriminator", action="store_true",
                        help="taming: also convert loss.discriminator (its PatchGAN) into discriminator.safetensors, "
                             "which model.init_from then starts D from")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    options = {k: v for k, v in (("config", args.config), ("resolution", args.resolution), ("ema", args.ema))
               if v is not None}
    if args.keep_discriminator:
        if args.kind != "taming":
            parser.error("--keep-discriminator applies to --from taming (the other sources ship no PatchGAN)")
        options["keep_discriminator"] = True
    if args.kind == "diffusers" and ("ema" in options or "resolution" in options):
        parser.error("--ema and --resolution do not apply to diffusers folders")

    from vqgan.convert import load_source, write_converted
    from vqgan.tokenizer import VQTokenizer

    converted = load_source(args.kind, args.src, **options)
    out = write_converted(converted, args.out_dir)
    tokenizer = VQTokenizer.from_pretrained(out)  # proves the folder loads on its own
    info = converted.source
    h, w = tokenizer.image_size
    print(f"converted {args.kind} {args.src} ({info['weights']} weights) -> {out}")
    print(f"{info['keys_mapped']} tensors mapped one to one, {info['keys_dropped']} dropped (loss / EMA shadows / "
          f"training buffers); K={tokenizer.num_codes} ({tokenizer.config.quantizer.kind}), "
          f"code_dim={tokenizer.code_dim}, f={tokenizer.downsample_factor}, {h}x{w} -> "
          f"{tokenizer.tokens_per_image(h, w)} tokens"
          + ("; discriminator kept (discriminator.safetensors)" if converted.discriminator is not None else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
