"""Data: sources (synthetic world, image folders, ArrayRecord shards, TFDS), robust decoding and
the grain pipelines every stage trains and evaluates on."""
from psvae_jax.data.config import default_data_config
from psvae_jax.data.decode import decode_image, decode_text, encode_image
from psvae_jax.data.errors import BadImage, BadRecord, DataError
from psvae_jax.data.loader import (DataIterator, make_eval_batches, make_train_iterator,
                                     resolve_data_config)
from psvae_jax.data.preprocess import resize_center_crop
from psvae_jax.data.shards import ShardWriter, decode_record, encode_record
from psvae_jax.data.sources import eval_source, parse_source, train_source
from psvae_jax.data.synthetic import (EditSample, Scene, ShapeObject, caption, render,
                                      sample_edit, sample_scene)
from psvae_jax.data.synthetic_score import detect_objects, dominant_colour_in_region, match_scene

__all__ = [
    "BadImage", "BadRecord", "DataError", "DataIterator", "EditSample", "Scene", "ShapeObject",
    "ShardWriter", "caption", "decode_image", "decode_record", "decode_text",
    "default_data_config", "detect_objects", "dominant_colour_in_region", "encode_image",
    "encode_record", "eval_source", "make_eval_batches", "make_train_iterator", "match_scene",
    "parse_source", "render", "resize_center_crop", "resolve_data_config", "sample_edit",
    "sample_scene", "train_source",
]
