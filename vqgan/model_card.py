"""Model cards (README.md) of tokenizer and prior folders: what it is, how to load it, how it was trained."""

from __future__ import annotations

from typing import Any, Mapping

from vqgan.folder_format import CONFIG_NAME, GRID_NAME, ONNX_FILES, WEIGHTS_NAME


def model_card(config: Mapping[str, Any], onnx_image_size: tuple[int, int] | None = None,
               evaluation: Mapping[str, Any] | None = None, grid: bool = False) -> str:
    """A short README.md: what the tokenizer is, how to load it, what it was trained on, how it scored.

    `evaluation`: metric -> value (vqgan-evaluate's figures); `grid`: the folder holds reconstructions.png.
    """
    f, k, d = config["downsample_factor"], config["num_codes"], config["code_dim"]
    size = config["image_size"]
    h, w = size[0] // f, size[1] // f
    extra_files = ONNX_FILES if onnx_image_size else ()
    lines = [
        "---",
        "library_name: vqgan",
        "tags: [image-tokenizer, vqgan, vq-vae]",
        "---",
        "",
        "# VQGAN image tokenizer",
        "",
        f"- codebook: K = {k} codes of dimension {d}",
        f"- downsampling factor f = {f}: a {size[0]}x{size[1]} image becomes {h}x{w} = {h * w} tokens",
        *_multi_scale_line(config),
        "- images at the API: float in [0, 1] (or uint8), shape (B, 3, H, W), H and W multiples of f",
        f"- files: {CONFIG_NAME} (format {config['format_version']}), {WEIGHTS_NAME}"
        + "".join(f", {name}" for name in extra_files),
        "",
        "## Use",
        "",
        "```python",
        "from vqgan import VQTokenizer",
        "",
        'tok = VQTokenizer.from_pretrained("path/to/this/folder")  # or a Hub repo id',
        "ids = tok.encode(images)          # (B, H/f, W/f) int64 in [0, K)",
        "recon = tok.decode(ids)           # (B, 3, H, W) float in [0, 1]",
        "vectors = tok.embed(ids)          # (B, H/f, W/f, code_dim)",
        "```",
        "",
        "Loading reads only JSON and safetensors; nothing is unpickled.",
    ]
    if onnx_image_size:
        oh, ow = onnx_image_size
        lines += ["", f"The ONNX graphs take {oh}x{ow} images and any batch size: `encoder.onnx` maps `images` "
                      f"(float [0, 1], (B, 3, {oh}, {ow})) to `ids` (int64, (B, {oh // f}, {ow // f})); "
                      "`decoder.onnx` maps `ids` back to `images`."]
    summary = config.get("train_summary")
    lines += ["", "## Training", ""]
    if summary and summary.get("converted_from"):
        origin = summary["converted_from"]
        lines.append(f"Converted from a {origin.get('kind')} checkpoint ({origin.get('path')}, "
                     f"{origin.get('weights', 'raw')} weights) by `vqgan-convert`; not trained by vqgan.")
    elif summary:
        for key in ("step", "images_seen", "data", "weights"):
            if key in summary:
                lines.append(f"- {key.replace('_', ' ')}: {summary[key]}")
        metrics = summary.get("metrics") or summary.get("eval") or {}
        if metrics:
            lines += ["", "| held-out metric | value |", "| --- | --- |"]
            lines += [f"| {name} | {_fmt(value)} |" for name, value in sorted(metrics.items())]
    else:
        lines.append("Unknown (exported from a model without a training summary).")
    lines += evaluation_section(evaluation, grid)
    return "\n".join(lines) + "\n"


def evaluation_section(evaluation: Mapping[str, Any] | None, grid: bool) -> list[str]:
    """Markdown lines: a table of evaluation figures (rFID labelled with its setup), the setup, notes and grid.

    `evaluation["setup"]`: vqgan-evaluate's record of what the figures were measured on (protocol, split,
    image count, feature extractor); an rFID without one is published as "protocol not recorded".
    """
    if not evaluation and not grid:
        return []
    evaluation = evaluation or {}
    setup = evaluation.get("setup")
    lines = ["", "## Evaluation", ""]
    figures = {k: v for k, v in evaluation.items() if isinstance(v, (int, float)) or v is None}
    if figures:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {_figure_name(name, setup)} | {'n/a' if value is None else _fmt(value)} |"
                  for name, value in figures.items()]
    if isinstance(setup, Mapping):
        lines.append(f"- setup: {describe_setup(setup)}")
    for key in ("protocol", "data", "notes"):
        value = evaluation.get(key)
        if value:
            lines.append(f"- {key}: {'; '.join(value) if isinstance(value, list) else value}")
    if grid:
        lines += ["", f"![originals (top) and reconstructions (bottom)]({GRID_NAME})"]
    return lines


def describe_setup(setup: Mapping[str, Any]) -> str:
    """One line from vqgan-evaluate's setup record: protocol, split, image count, images, features, precision."""
    crop = setup.get("crop")
    protocol = f"{setup.get('protocol')} ({'shorter side ' + str(crop) + ', centre crop' if crop else 'images as they are'})"
    split = setup.get("split") or "-"
    return (f"protocol {protocol}; split {split}; {setup.get('num_images')} images ({setup.get('images')}); "
            f"features {setup.get('feature_extractor') or 'none (rFID skipped)'}; fp32 {setup.get('float32')}")


def _figure_name(name: str, setup: Any) -> str:
    """rFID only means something with its protocol and image count: say them in the row itself."""
    if name != "rfid":
        return name
    if not isinstance(setup, Mapping):
        return "rfid (protocol not recorded)"
    return f"rfid ({setup.get('protocol')}, split {setup.get('split') or '-'}, {setup.get('num_images')} images)"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _multi_scale_line(config: Mapping[str, Any]) -> list[str]:
    """msvq: the id sequence is Σ s² over the scales, not the latent grid."""
    quantizer = config.get("model", {}).get("quantizer", {})
    if quantizer.get("kind") != "msvq":
        return []
    scales = list(quantizer["scales"])
    return [f"- multi-scale residual ids (VAR): one sequence of {sum(s * s for s in scales)} ids an image over "
            f"scales {scales}, coarse to fine"]
