"""Input pipeline throughput: decoded + preprocessed images/s at 256 px.

  python -m benchmarks.input_pipeline [--batches=6] [--repeats=3] [--out=FILE.json]

Measures the synthetic world's raw generation rate (one thread) and the full training iterator
(grain, read threads, batching) over the synthetic source, a folder of generated JPEGs and
ArrayRecord shards of the same JPEGs, with 0 and 2 worker processes; reports the median over
repeats (the first batch of each iterator, including worker start-up, is not timed).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from benchmarks.timing import write_json
from psvae_jax.data import ShardWriter, encode_image, make_train_iterator, synthetic

IMAGE_SIZE = 256
BATCH = 32


def _write_jpegs(root: str, n: int, shape=(384, 512)) -> list[bytes]:
  """n random-texture JPEGs (smooth noise, so they compress like photos) under root/."""
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(0)
  blobs = []
  for i in range(n):
    coarse = rng.integers(0, 256, (shape[0] // 16, shape[1] // 16, 3), dtype=np.uint8)
    img = np.kron(coarse, np.ones((16, 16, 1), np.uint8))
    img = np.clip(img.astype(np.int16) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
    blob = encode_image(img, format="jpeg", quality=90)
    with open(os.path.join(root, f"{i:05d}.jpg"), "wb") as f:
      f.write(blob)
    blobs.append(blob)
  return blobs


def _rate(fn, count: int, repeats: int) -> float:
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    rates.append(count / (time.perf_counter() - start))
  return statistics.median(rates)


def _pipeline_rate(source: str, workers: int, batches: int, repeats: int) -> float:
  cfg = {"source": source, "image_size": IMAGE_SIZE, "num_workers": workers, "eval_size": 0}
  it = make_train_iterator(cfg, global_batch_size=BATCH, seed=0, process_index=0, process_count=1)
  try:
    next(it)  # start-up (threads, worker processes) is not timed
    return _rate(lambda: [next(it) for _ in range(batches)], batches * BATCH, repeats)
  finally:
    it.close()


def run(batches: int = 6, repeats: int = 3, workers=(0, 2)) -> dict:
  """Returns {name: images/s} for raw generation and each source x worker count."""
  results = {
      "synthetic shapes, raw (1 thread)": _rate(
          lambda: [synthetic.shapes_example(i, IMAGE_SIZE) for i in range(200)], 200, repeats),
      "synthetic edits, raw (1 thread)": _rate(
          lambda: [synthetic.edits_example(i, IMAGE_SIZE) for i in range(100)], 100, repeats),
  }
  with tempfile.TemporaryDirectory() as tmp:
    blobs = _write_jpegs(os.path.join(tmp, "jpegs"), 256)
    with ShardWriter(os.path.join(tmp, "shards"), "bench", records_per_shard=64) as writer:
      for i, blob in enumerate(blobs):
        writer.write({"image": blob, "caption": f"image {i}"})
    sources = {
        "synthetic:shapes": "synthetic:shapes",
        "folder (512x384 JPEG)": f"folder:{tmp}/jpegs",
        "arrayrecord (512x384 JPEG)": f"arrayrecord:{tmp}/shards/bench-*.array_record",
    }
    for name, spec in sources.items():
      for w in workers:
        results[f"{name}, workers={w}"] = _pipeline_rate(spec, w, batches, repeats)
  return results


def parse_args(argv):
  """The command line (see the module docstring); argv without the program name."""
  parser = argparse.ArgumentParser(prog="python -m benchmarks.input_pipeline",
                                   description="Input pipeline throughput at 256 px.")
  parser.add_argument("--batches", type=int, default=6, help="timed batches per iterator")
  parser.add_argument("--repeats", type=int, default=3, help="repeats (the median is reported)")
  parser.add_argument("--out", default="", help="output JSON file ('' = none)")
  return parser.parse_args(argv)


def main(argv):
  args = parse_args(argv[1:])
  out, kwargs = args.out, dict(batches=args.batches, repeats=args.repeats)
  results = run(**kwargs)
  width = max(map(len, results))
  print(f"{'input pipeline (256 px, images/s, median)':<{width}}  rate")
  for name, rate in results.items():
    print(f"{name:<{width}}  {rate:8.0f}")
  print(f"(cpu count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f})")
  write_json({"images_per_s": results, "image_size": IMAGE_SIZE, "batch": BATCH,
              "cpu_cores": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}, out)


if __name__ == "__main__":
  main(sys.argv)
