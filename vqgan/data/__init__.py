"""Image data for tokenizer training: decode what PIL can read, skip what it cannot, crop to (3, S, S).

Every item is a float tensor (3, S, S) in [-1, 1], the range inside the models. Sources, each one `Source`
(vqgan.data.sources): "embedded" (photographs that ship with scikit-image, so a fresh machine without
network can train), a HuggingFace hub dataset name ("cifar10") or a local folder of images (mapstyle,
tables); "wds:PATTERN" WebDataset shards (shard_source, shards; written by make_shards); and, with
`streaming: true`, hub datasets read as they arrive (streaming). The modules, one concern each:

    config        DataConfig and the constants its sources share
    decode        bytes -> upright RGB -> resized -> (3, S, S) crop in [-1, 1]
    items         one sample -> item or BadItem; batches of them (collate)
    ranks         which process this is; the one split of N items over processes (and workers)
    tables        hub / folder / embedded tables, node-local index pointer, hold-outs, start-up checks
    mapstyle      ImageDataset, EpochSampler, and the table source (MapSource)
    shards        the tar shard format and its split, shuffle and exact resume (ShardStream)
    shard_source  the "wds:" source (ShardSource)
    streaming     streamed hub datasets (HubStream) and their source (StreamSource)
    sources       the Source interface, source_of (the one dispatch), build_dataset, build_dataloader
    make_shards   the vqgan-make-shards tool
"""

from vqgan.data import shards
from vqgan.data.config import EMBEDDED_EVAL, EMBEDDED_PHOTOS, SPLITS, DataConfig
from vqgan.data.decode import crop_pixels, crop_to_tensor, decode_image, resized_pixels, to_rgb
from vqgan.data.items import BadItem, CollateImages, CollateKeyed, ShardItem
from vqgan.data.mapstyle import EpochSampler, ImageDataset
from vqgan.data.ranks import process_state, rank_share
from vqgan.data.sources import Source, build_dataloader, build_dataset, source_of
from vqgan.data.tables import embedded_dataset

__all__ = [
    "EMBEDDED_EVAL", "EMBEDDED_PHOTOS", "SPLITS", "BadItem", "CollateImages", "CollateKeyed", "DataConfig",
    "EpochSampler", "ImageDataset", "ShardItem", "Source", "build_dataloader", "build_dataset", "crop_pixels",
    "crop_to_tensor", "decode_image", "embedded_dataset", "process_state", "rank_share", "resized_pixels", "shards",
    "source_of", "to_rgb",
]
