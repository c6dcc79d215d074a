"""What a run's data is: `DataConfig` (the recipe's `data:` section) and the constants its sources share."""

from __future__ import annotations

from dataclasses import dataclass

SPLITS = ("train", "eval")

# RGB photographs in the scikit-image wheel itself (no pooch download), checked with skimage 0.26 offline.
# Left out: cat (the same pixels as chelsea), camera (grayscale), colorwheel and logo (not photographs).
EMBEDDED_PHOTOS = (
    "astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "motorcycle", "retina", "rocket",
)
# Whole photographs held out of training, so eval reconstructions are of images the model never saw.
EMBEDDED_EVAL = ("coffee", "rocket")

# How many file names the folder-format check reads at most (parquet or images).
FORMAT_SCAN_LIMIT = 200
# How many headers the crop-size check reads at most: enough to catch a misconfiguration, cheap on ImageNet.
SIZE_SCAN_LIMIT = 1000


@dataclass(frozen=True)
class DataConfig:
    # "embedded" | a HuggingFace hub dataset name ("cifar10") | a local folder of images (imagefolder) |
    # "wds:PATTERN" tar shards (brace patterns / globs of paths, URLs, pipe: commands).
    source: str = "embedded"
    # Split of the source used for training (for a folder: "train" unless it has train/test subfolders).
    split: str = "train"
    # Split of the source used for evaluation; None: hold `num_eval_images` rows out of `split` instead.
    eval_split: str | None = None
    # Column holding the images (cifar10 calls it "img").
    image_column: str = "image"
    # Column of integer class labels to return as batch["labels"] (a folder with class subfolders: "label").
    label_column: str | None = None
    # Side S of the square crops the model sees.
    image_size: int = 256
    # Resize the shorter side to this before cropping (taming-transformers: = image_size); None = native scale.
    resize: int | None = None
    # Training crops at a random position; False: centre crops. Eval always uses centre crops.
    random_crop: bool = True
    # Flip training crops left-right with probability 1/2. Eval never flips.
    hflip: bool = True
    # DataLoader worker processes; 0 decodes in the main process.
    num_workers: int = 0
    # Train on a fixed random subset of this many rows (the same subset every run; streams: the first
    # ones); None = all.
    max_images: int | None = None
    # Cap on eval images; with eval_split None, this many rows of `split` are held out for eval.
    num_eval_images: int | None = None
    # "embedded" only: random crops drawn per training photo per epoch, so an epoch has a useful length.
    embedded_repeats: int = 32
    # Where `datasets` caches hub downloads and imagefolder indexes; None = its default (~/.cache).
    cache_dir: str | None = None
    # Hub datasets (or a local parquet / image folder): read as a stream (datasets' IterableDataset), never
    # downloaded whole; eval rows are the first num_eval_images of eval_split (or held out of split).
    streaming: bool = False
    # Decode JPEGs at a reduced scale (1/2, 1/4, 1/8) when `resize` is at most half their shorter side.
    jpeg_draft: bool = True
    # Streams ("wds:" shards, streaming): samples held in the shuffle buffer (raw bytes; 1 = no buffer).
    shuffle_buffer: int = 1000
    # "wds:PATTERN" sources: the index.json with each shard's sample count; None = the one beside the shards
    # (local shards without one are counted from their tar headers at start).
    shard_index: str | None = None
    # "wds:" sources: shards each DataLoader worker reads at once, their samples merged in a random order
    # before the shuffle buffer (1 = one shard after another).
    shard_interleave: int = 8

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {self.image_size}")
        if self.resize is not None and self.resize < self.image_size:
            raise ValueError(
                f"resize={self.resize} is smaller than image_size={self.image_size}: a {self.image_size}-px crop "
                f"cannot fit in an image whose shorter side is {self.resize}"
            )
        for name in ("max_images", "num_eval_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or at least 1, got {value}")
        if self.embedded_repeats < 1:
            raise ValueError(f"embedded_repeats must be at least 1, got {self.embedded_repeats}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.streaming and (self.source == "embedded" or self.source.startswith("wds:")):
            raise ValueError(f"streaming: true is for hub datasets (and local parquet / image folders); "
                             f"{self.source!r} is {'a stream already' if self.source.startswith('wds:') else 'in memory'}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be at least 1 (1 = no buffer), got {self.shuffle_buffer}")
        if self.shard_interleave < 1:
            raise ValueError(f"shard_interleave must be at least 1 (1 = one shard at a time), got {self.shard_interleave}")
