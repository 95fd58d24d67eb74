"""The data keys every stage shares; stage configs embed them as `config.data` and lock them."""
import ml_collections


def default_data_config() -> ml_collections.ConfigDict:
  """Returns the default `config.data` block (every key a user may set lives here)."""
  c = ml_collections.ConfigDict()
  # Where training examples come from: 'synthetic:shapes', 'synthetic:edits', 'folder:PATH',
  # 'arrayrecord:GLOB' or 'tfds:NAME[:SPLIT]' (see psvae_jax/data/sources.py).
  c.source = "synthetic:shapes"
  # Held-out examples for eval. '' = a part of `source` kept out of training: a disjoint index
  # range for synthetic sources, a fixed pseudo-random subset of `eval_size` records for
  # folder/arrayrecord, the 'validation' split for tfds.
  c.eval_source = ""
  # Size of the held-out part of `source` when `eval_source` is ''.
  c.eval_size = 1000
  # Output images are (image_size, image_size, 3) uint8: shorter side resized, centre crop.
  c.image_size = 256
  # Horizontal flip with probability 1/2 (images and edit masks). Off by default; refused for
  # synthetic sources because their captions name left and right.
  c.random_flip = False
  # Global shuffle (reshuffled every epoch). False keeps the source order (still repeated).
  c.shuffle = True
  # Number of examples in the synthetic world used for training (index range [0, size)).
  c.synthetic_size = 100_000
  # grain worker processes (0 = decode in threads of the training process).
  c.num_workers = 0
  # With worker processes: the longest the training loop waits inside one next() for a batch
  # before the workers count as stuck and are restarted (the first batch after the workers start
  # gets 120 s more; time spent outside next(), e.g. compiling, never counts; 0 = no limit).
  c.worker_timeout_s = 300.0
  # How often per launch the workers are restarted at the exact position after one dies (e.g.
  # the OOM killer's SIGKILL) or is stuck; past that the pipeline stops with DataError.
  c.worker_restarts = 2
  # Decoding threads in each process (the training process or each worker).
  c.read_threads = 8
  # Batches buffered ahead (per worker when num_workers > 0).
  c.prefetch = 2
  # Undecodable records are skipped and counted; above this fraction of the records read (after
  # at least 100 of them) the pipeline raises DataError naming examples.
  c.max_bad_fraction = 0.01
  # Images whose header claims more pixels than this are refused before decoding.
  c.max_image_pixels = 8192 * 8192
  # Images whose shorter side is below this are skipped as too small.
  c.min_image_size = 32
  # True: a record with a missing or unreadable caption is skipped (counted as bad) instead of
  # getting the empty caption (which is counted in stats()['caption_fallback']).
  c.skip_uncaptioned = False
  # tfds sources: the text feature used as caption ('' = none) and the data_dir ('' = default).
  c.caption_key = ""
  c.tfds_data_dir = ""
  return c
