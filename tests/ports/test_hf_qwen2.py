"""Qwen2 text-encoder port: Qwen2ForCausalLM (tied and untied head) and Qwen2Model checkpoints,
right-padded batches (non-padded positions compared), scanned layers, sliding-window layers,
and the forward sharded over 8 simulated devices."""
import numpy as np
import pytest
import torch
from helpers.hf_reference import jitted, quiet_transformers, save, sharded_forward

from psvae_jax.ports import hf

quiet_transformers()
TOL = 1e-4


def _config(**overrides):
  from transformers import Qwen2Config
  kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
  kw.update(overrides)
  return Qwen2Config(**kw)


def _batch(batch=4, seq=11, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 128, (batch, seq))
  lengths = np.array([seq, 7, 3, 1] * (batch // 4 + 1))[:batch]
  mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)  # right padding
  ids = np.where(mask == 1, ids, 0)
  return ids, mask


def _reference(model, ids, mask):
  base = getattr(model, "model", model)
  with torch.inference_mode():
    return base(input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()


def _masked_err(out, ref, mask):
  return float(np.abs((np.asarray(out) - ref) * mask[..., None]).max())


@pytest.mark.parametrize("tied", [True, False])
def test_causal_lm_checkpoint_padded_batch(tied, tmp_path):
  from transformers import Qwen2ForCausalLM
  torch.manual_seed(0)
  model = Qwen2ForCausalLM(_config(tie_word_embeddings=tied)).eval()
  path = save(model, tmp_path)
  ids, mask = _batch()
  ref = _reference(model, ids, mask)
  for scan in ((False, True) if tied else (False,)):
    out = jitted(hf.load(path, scan_layers=scan))(ids, mask)
    assert out.shape == (4, 11, 64)
    assert _masked_err(out, ref, mask) <= TOL, scan


def test_base_model_checkpoint_and_sliding_window(tmp_path):
  from transformers import Qwen2Model
  torch.manual_seed(1)
  config = _config(num_hidden_layers=3, use_sliding_window=True, sliding_window=4,
                   max_window_layers=1, attn_implementation="eager")
  model = Qwen2Model(config).eval()
  module = hf.load(save(model, tmp_path))
  assert module.config.layer_types == ("full_attention", "sliding_attention",
                                       "sliding_attention")
  ids, mask = _batch(seed=2)
  assert _masked_err(jitted(module)(ids, mask), _reference(model, ids, mask), mask) <= TOL


def test_forward_sharded_on_8_devices(tmp_path):
  from transformers import Qwen2ForCausalLM
  torch.manual_seed(2)
  model = Qwen2ForCausalLM(_config()).eval()
  module = hf.load(save(model, tmp_path))
  ids, mask = _batch(batch=8)
  out, state = sharded_forward(module, ids, mask)
  assert "fsdp" in str(state["embed"]["embedding"].get_value().sharding.spec)
  assert _masked_err(out, _reference(model, ids, mask), mask) <= TOL
