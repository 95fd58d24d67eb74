"""Flaky storage under the data sources: the first k reads of a file or shard fail with a
transient error (tests/helpers/flaky_reads.py).

k below config.io.retries: the read succeeds, with k warnings naming the path, and the batch is
the one an undisturbed read gives. Retries spent: the record is skipped and counted as bad with
a reason saying it was retried (a captions.jsonl that cannot be read stops with a DataError
naming it). The backoff is 0 s here; the policy's own timing is tested in test_storage_retry.
"""
import json
import logging
import pickle

import numpy as np
import pytest

from helpers.flaky_reads import FlakyReads
from psvae_jax.data import DataError, make_train_iterator
from psvae_jax.data import sources
from psvae_jax.data.decode import encode_image
from psvae_jax.data.shards import ShardWriter
from psvae_jax.storage_retry import RetryPolicy

pytestmark = pytest.mark.reliability

N = 4
RETRIES = 3


def _policy():
  return RetryPolicy(retries=RETRIES, initial_backoff_s=0.0, max_backoff_s=0.0)


@pytest.fixture
def flaky(monkeypatch):
  return FlakyReads(monkeypatch)


def _folder(root, captions="sidecar"):
  root.mkdir()
  lines = []
  for i in range(N):
    (root / f"img_{i}.png").write_bytes(encode_image(np.full((40, 40, 3), 30 * i, np.uint8)))
    if captions == "sidecar":
      (root / f"img_{i}.txt").write_text(f"caption {i}")
    lines.append(json.dumps({"file": f"img_{i}.png", "caption": f"caption {i}"}))
  if captions == "jsonl":
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
  return f"folder:{root}"


def _shards(root, records):
  with ShardWriter(str(root), "train", records_per_shard=2) as writer:
    for record in records:
      writer.write(record)
  return f"arrayrecord:{root}/train-*.array_record"


def _first_batch(source, batch=N):
  it = make_train_iterator({"source": source, "image_size": 32, "eval_size": 0,
                            "shuffle": False, "read_threads": 1, "prefetch": 0},
                           global_batch_size=batch, seed=0, process_index=0, process_count=1,
                           read_retry=_policy())
  out = next(it)
  stats = it.stats()
  it.close()
  return out, stats


def _warnings(caplog, path_fragment):
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING and path_fragment in r.getMessage()]


def _assert_retried(caplog, flaky, fragment, k):
  lines = _warnings(caplog, fragment)
  assert len(lines) == k, lines
  assert all("(attempt" in line and "Input/output error" in line for line in lines)
  assert sum(n for path, n in flaky.failures.items() if fragment in path) == k


# case -> (write the data under tmp_path: source spec, fragment of the path made flaky)
CASES = {
    "a folder image": (lambda tmp: _folder(tmp / "images"), "img_2.png"),
    "a sidecar caption file": (lambda tmp: _folder(tmp / "images"), "img_1.txt"),
    "an ArrayRecord shard": (lambda tmp: _shards(tmp / "shards", [
        {"image": encode_image(np.full((40, 40, 3), 30 * i, np.uint8)), "caption": f"c {i}"}
        for i in range(N)]), "train-00001.array_record"),
}


@pytest.mark.reliability(fault="flaky storage: first {k} reads of {case} fail (EIO)",
                         expected="retried: same batch as undisturbed, k warnings naming the path")
@pytest.mark.parametrize("k", [1, RETRIES])
@pytest.mark.parametrize("case", list(CASES))
def test_transient_read_errors_are_retried(tmp_path, flaky, caplog, case, k):
  write, fragment = CASES[case]
  source = write(tmp_path)
  expected, _ = _first_batch(source)
  flaky.fail(fragment, k)
  with caplog.at_level(logging.WARNING):
    batch, stats = _first_batch(source)
  assert stats["bad"] == 0
  for key in expected:
    np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)
  _assert_retried(caplog, flaky, fragment, k)


@pytest.mark.reliability(fault="flaky storage: {case} fails on every attempt (EIO)",
                         expected="record skipped and counted as bad, reason says it was retried")
@pytest.mark.parametrize("case", list(CASES))
def test_a_record_still_failing_after_the_retries_is_a_counted_bad_record(tmp_path, flaky,
                                                                          caplog, case):
  write, fragment = CASES[case]
  source = write(tmp_path)
  flaky.fail(fragment, 10**6)
  with caplog.at_level(logging.WARNING):
    batch, stats = _first_batch(source, batch=N - 1)
  assert len(batch["image"]) == N - 1 and stats["bad"] >= 1
  reason = stats["examples_of_bad"][0]
  assert fragment in reason
  assert "unreadable after retrying transient errors" in reason
  assert f"failed after {RETRIES + 1} attempts" in reason and "Input/output error" in reason
  # Each skipped record was retried RETRIES times (grain may read ahead past the batch, so
  # there can be more).
  lines = _warnings(caplog, fragment)
  assert len(lines) >= RETRIES * stats["bad"] and all("(attempt" in line for line in lines)


@pytest.mark.reliability(fault="flaky storage: first {k} reads of a latent cache shard fail",
                         expected="retried; the cached latents and text states arrive unchanged")
@pytest.mark.parametrize("k", [1, RETRIES])
def test_latent_cache_read_is_retried(tmp_path, flaky, caplog, k):
  rng = np.random.default_rng(0)
  records = [{"latent": rng.standard_normal((4, 4, 8)).astype(np.float32),
              "text_states": rng.standard_normal((6, 16)).astype(np.float32),
              "text_mask": np.array([1, 1, 1, 0, 0, 0], np.int32), "caption": f"c {i}"}
             for i in range(N)]
  source = _shards(tmp_path / "cache", records)
  flaky.fail("train-00000.array_record", k)
  with caplog.at_level(logging.WARNING):
    batch, stats = _first_batch(source)
  assert stats["bad"] == 0
  for key in ("latent", "text_states", "text_mask"):
    np.testing.assert_array_equal(batch[key], np.stack([r[key] for r in records]))
  _assert_retried(caplog, flaky, "train-00000.array_record", k)


@pytest.mark.reliability(fault="flaky storage: captions.jsonl fails {k} times (retries=3)",
                         expected="k <= 3: captions read; otherwise DataError naming the file")
@pytest.mark.parametrize("k", [RETRIES, RETRIES + 1])
def test_captions_file_read_is_retried_or_names_the_file(tmp_path, flaky, caplog, k):
  _folder(tmp_path / "images", captions="jsonl")
  flaky.fail("captions.jsonl", k)
  with caplog.at_level(logging.WARNING):
    if k > RETRIES:
      with pytest.raises(DataError, match=r"captions\.jsonl.*failed after 4 attempts.*"
                                          r"Input/output error"):
        sources.FolderSource(str(tmp_path / "images"), _policy())
      return
    source = sources.FolderSource(str(tmp_path / "images"), _policy())
  assert source.captions["img_3.png"] == "caption 3"
  assert len(_warnings(caplog, "captions.jsonl")) == k


@pytest.mark.reliability(fault="a folder image deleted after the listing (FileNotFoundError)",
                         expected="a bad record at once: permanent errors are not retried")
def test_permanent_errors_are_not_retried(tmp_path, flaky, caplog):
  root = tmp_path / "images"
  _folder(root)
  source = sources.FolderSource(str(root), _policy())
  (root / "img_0.png").unlink()
  with caplog.at_level(logging.WARNING):
    bad = source[source.files.index("img_0.png")]
  assert "cannot read file" in bad.reason and "No such file" in bad.reason
  assert not _warnings(caplog, "img_0.png")


@pytest.mark.reliability(fault="sources pickled into grain's worker processes",
                         expected="config.io's retry policy travels with them")
def test_the_policy_travels_with_the_sources_into_worker_processes(tmp_path):
  policy = RetryPolicy(retries=7, initial_backoff_s=0.25, max_backoff_s=2.0)
  _folder(tmp_path / "images")
  folder = sources.FolderSource(str(tmp_path / "images"), policy)
  image = encode_image(np.zeros((40, 40, 3), np.uint8))
  spec = _shards(tmp_path / "shards", [{"image": image}] * 3)
  shards = sources.ArrayRecordSource(spec.split(":", 1)[1], policy)
  for source in (folder, shards):
    copy = pickle.loads(pickle.dumps(source))
    assert copy.read_retry == policy
    assert len(copy) == len(source)
  assert pickle.loads(pickle.dumps(shards))[2]["image"] == shards[2]["image"]
