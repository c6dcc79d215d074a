"""One HTML page summarising a tokenizer's evaluation: figures, reconstructions, usage, codebook t-SNE.

Self-contained: the PNGs are embedded as data URIs, so the page can be mailed or attached on its own.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Mapping, Sequence

from vqgan.utils import atomic_write_text


def _image_tag(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _value(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def write_summary_page(path: str | Path, title: str, metrics: Mapping[str, Any], notes: Sequence[str],
                       figures: Sequence[tuple[str | Path, str]]) -> Path:
    """Write `path` (HTML): a metrics table, the notes, then each (png, caption) that exists."""
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_value(v)}</td></tr>" for k, v in metrics.items())
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    images = "".join(_image_tag(Path(p), c) for p, c in figures if Path(p).is_file())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td{{border:1px solid #ccc;padding:2px 10px}}figure{{display:inline-block;margin:1em;vertical-align:top}}
img{{max-width:1000px;image-rendering:pixelated}}</style></head>
<body><h1>{html.escape(title)}</h1>
<table><tr><td><b>metric</b></td><td><b>value</b></td></tr>{rows}</table>
<ul>{items}</ul>
{images}
</body></html>
"""
    path = Path(path)
    atomic_write_text(path, page)
    return path
