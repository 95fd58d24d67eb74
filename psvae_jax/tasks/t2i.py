"""Text-to-image stage: an MMDiT generator trained with rectified flow on the PS-VAE latent.

The model (`T2IModel`) holds the trainable `generator` (MMDiT, with RAE's DDT head per config)
and frozen pieces: the Qwen2 `text_encoder`, the PS-VAE's `encoder` and E_s (`svae`, its D_s
removed) that turn images into latents, its `pixel_decoder` for samples, and `latent_norm`, the
PS-VAE run's per-channel latent mean/std (frozen parameters, so they are saved and restored with
every checkpoint of this stage).

Data -> latent and text condition:
  x0   = (E_s(encoder(image)).mean - mean) / std        (B, h, w, C), or a cached batch['latent']
  text = text_encoder(input_ids, attention_mask)          last hidden state (B, L, D), or cached
                                                          batch['text_states'] / ['text_mask']
  pooled = masked mean of text over real tokens
Loss (docs/method.md#rectified-flow): t ~ sigmoid(N(0, 1)) shifted by s = sqrt(C P^2 / 16) (or
config.flow.shift), x_t = (1 - t) x0 + t eps, v = eps - x0, MSE over latent elements. With
probability config.flow.caption_dropout a caption is replaced by the empty caption '' (which
tokenises to the end-of-text token alone, see psvae_jax/tokenizers.py): its text states come
from the same frozen text encoder, and the same empty condition is the unconditional branch of
classifier-free guidance when sampling.
Eval: the flow loss at fixed times config.flow.eval_times on held-out batches (fixed noise).
Samples: Euler (config.flow.sample_steps, inference shift sample_shift, CFG cfg_scale) from the
EMA generator on held-out captions, denormalised and decoded by the PS-VAE pixel decoder.

Initialisation (`config.init` = the PS-VAE run's workdir, `T2ITask.parent`): the model section
config.model.autoencoder is the run's stored one (the config's own is the default for a start
without it), encoder, E_s and pixel decoder from its EMA weights (its trained weights when it
kept no EMA), latent statistics from its checkpoint extras; the text encoder from `config.model.text_encoder_init` (a converted Qwen2 directory).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psvae_jax import checkpoint as ckpt_lib
from psvae_jax import flow
from psvae_jax.config_base import ConfigError
from psvae_jax.data.errors import DataError
from psvae_jax.models import mmdit
from psvae_jax.models import text_encoder as text_encoder_lib
from psvae_jax.models.ddt_head import DDTHeadConfig
from psvae_jax.models.flops import mmdit_train_flops, text_encoder_forward_flops
from psvae_jax.tasks import autoencoder_parts
from psvae_jax.tasks.autoencoder import pixel_decoder_from_config, unit_range_to_uint8
from psvae_jax.tasks.base import ParentRun, Task
from psvae_jax.tokenizers import build_tokenizer, tokenize

CACHED_KEYS = ("latent", "text_states", "text_mask")


# --- model ---------------------------------------------------------------------------------

class LatentNorm(nnx.Module):
  """Per-channel latent statistics: x = (z - mean) / std and back. Frozen parameters."""

  def __init__(self, channels: int):
    self.mean = nnx.Param(jnp.zeros((channels,), jnp.float32))
    self.std = nnx.Param(jnp.ones((channels,), jnp.float32))

  def normalize(self, z: jax.Array) -> jax.Array:
    return (z.astype(jnp.float32) - self.mean[...]) / self.std[...]

  def denormalize(self, x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32) * self.std[...] + self.mean[...]


def text_encoder_config(model_config) -> text_encoder_lib.TextEncoderConfig:
  name = model_config.text_encoder
  if name not in text_encoder_lib.PRESETS:
    raise ConfigError(f"config.model.text_encoder={name!r} is not a known text encoder preset; "
                      f"known: {sorted(text_encoder_lib.PRESETS)}")
  return text_encoder_lib.PRESETS[name]


def latent_grid(autoencoder_config) -> int:
  """Side of the PS-VAE latent grid (encoder tokens per side)."""
  c = autoencoder_parts.encoder_config(autoencoder_config)
  if autoencoder_config.encoder_resolution % c.patch_size:
    raise ConfigError(f"config.model.autoencoder.encoder_resolution="
                      f"{autoencoder_config.encoder_resolution} is not a multiple of the "
                      f"encoder's patch size {c.patch_size}")
  return autoencoder_config.encoder_resolution // c.patch_size


def generator_config(config) -> mmdit.MMDiTConfig:
  """The MMDiT shape: the named preset, fitted to the latent and the text encoder."""
  m = config.model
  if m.generator not in mmdit.PRESETS:
    raise ConfigError(f"config.model.generator={m.generator!r} is not a known MMDiT preset; "
                      f"known: {sorted(mmdit.PRESETS)}")
  grid = latent_grid(m.autoencoder)
  if grid % m.patch_size:
    raise ConfigError(f"the {grid}x{grid} latent is not divisible by config.model.patch_size="
                      f"{m.patch_size}")
  head = None
  if m.ddt_head:
    head = mmdit.PRESETS[m.generator].ddt_head or DDTHeadConfig()
  width = text_encoder_config(m).width
  return mmdit.mmdit_preset(
      m.generator, in_channels=m.autoencoder.latent_channels, patch_size=m.patch_size,
      sample_size=grid, pos_embed_max_size=grid, text_dim=width, pooled_dim=width,
      ddt_head=head, qk_norm=m.qk_norm or None, causal_text=m.causal_text,
      pos_embed=m.pos_embed)


class T2IModel(nnx.Module):
  """Generator (trainable) + text encoder, PS-VAE encoder/E_s/pixel decoder, latent stats."""

  def __init__(self, config, *, rngs: nnx.Rngs, generator: mmdit.MMDiTConfig | None = None):
    """`generator`: the MMDiT shape (default `generator_config(config)`; editing adds its
    source embedding)."""
    m, ae = config.model, config.model.autoencoder
    dtype = autoencoder_parts.compute_dtype(config)
    kw = dict(dtype=dtype, attention_impl=config.attention_impl, rngs=rngs)
    self.text_encoder = text_encoder_lib.build_text_encoder(
        text_encoder_config(m), rngs=rngs, dtype=dtype, attention_impl=config.attention_impl,
        scan_layers=m.scan_layers)
    self.encoder = autoencoder_parts.build_representation_encoder(ae, **kw)
    self.svae = autoencoder_parts.build_semantic_vae(ae, self.encoder, **kw)
    # Only E_s maps features to latents here; D_s is not part of this model.
    self.svae.dec_blocks = None
    self.svae.dec_proj = None
    self.pixel_decoder = pixel_decoder_from_config(ae, **kw)
    self.latent_norm = LatentNorm(ae.latent_channels)
    self.generator = mmdit.MMDiT(generator or generator_config(config),
                                 scan_layers=m.scan_layers,
                                 remat_policy=m.remat_policy or None, **kw)


def image_latents(model: T2IModel, images: jax.Array, autoencoder_config) -> jax.Array:
  """Normalised PS-VAE latents (posterior mean) of uint8 NHWC images, float32."""
  features = autoencoder_parts.encoder_features(model.encoder, images, autoencoder_config)
  z = model.svae.encode(features).mean
  return jax.lax.stop_gradient(model.latent_norm.normalize(z))


def text_states(model: T2IModel, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """The text encoder's last hidden state (B, L, D), float32."""
  states = model.text_encoder(input_ids, attention_mask).astype(jnp.float32)
  return jax.lax.stop_gradient(states)


def velocity(model: T2IModel, x_t, t, states, mask) -> jax.Array:
  """The generator's velocity with mean-pooled text as the pooled projection."""
  return model.generator.velocity(x_t, t, states, mmdit.mean_pool(states, mask),
                                  text_mask=mask)


def flow_loss_per_example(model: T2IModel, x0, noise, t, states, mask) -> jax.Array:
  """Mean squared velocity error per example, (B,)."""
  v = velocity(model, flow.noisy_latents(x0, noise, t), t, states, mask)
  return jnp.mean(jnp.square(v - flow.velocity_target(x0, noise)), axis=(1, 2, 3))


# --- loading -------------------------------------------------------------------------------

def _set_value(variable: nnx.Variable, value: np.ndarray) -> None:
  old = variable.get_value()
  if value.shape != old.shape:
    raise ValueError(f"shape {value.shape} does not match {old.shape}")
  variable.set_value(jax.device_put(jnp.asarray(value, old.dtype), old.sharding))


def set_latent_stats(params: nnx.State, stats: dict | None, *, what: str) -> nnx.State:
  """params['latent_norm'] <- a checkpoint's {'mean': [...], 'std': [...]}."""
  if not stats:
    raise ckpt_lib.CheckpointError(
        f"{what} holds no latent statistics (checkpoint extras 'latent_stats'): the PS-VAE run "
        "computes them after its last step when config.latent_stats_batches > 0; finish that "
        "run (or rerun it to its total_steps with latent_stats_batches set)")
  mean = np.asarray(stats.get("mean"), np.float32)
  std = np.asarray(stats.get("std"), np.float32)
  channels = params["latent_norm"]["mean"].get_value().shape
  if mean.shape != channels or std.shape != channels:
    raise ckpt_lib.CheckpointError(f"{what}: latent statistics have {mean.shape} / {std.shape} "
                                   f"entries, the latent has {channels[0]} channels")
  bad = [i for i in range(channels[0]) if not (np.isfinite(mean[i]) and np.isfinite(std[i])
                                               and std[i] > 0)]
  if bad:
    raise ckpt_lib.CheckpointError(f"{what}: latent statistics of channels {bad[:10]} are not "
                                   "finite or have std <= 0")
  _set_value(params["latent_norm"]["mean"], mean)
  _set_value(params["latent_norm"]["std"], std)
  return params


def load_text_encoder(params: nnx.State, path: str, model_config) -> nnx.State:
  """params['text_encoder'] <- a converted Qwen2 directory (`psvae_jax.tools.convert`)."""
  from psvae_jax.ports.common import read_json
  from psvae_jax.ports.converted import CONFIG_NAME, config_from_port_config

  where = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(where):
    raise ckpt_lib.CheckpointError(
        f"config.model.text_encoder_init={path!r}: not a converted-weights directory (no "
        f"{CONFIG_NAME}); convert the transformers checkpoint once with `python -m "
        "psvae_jax.tools.convert --src=... --out=DIR`")
  stored = config_from_port_config(read_json(where), where)
  wanted = text_encoder_config(model_config)
  if not isinstance(stored, text_encoder_lib.TextEncoderConfig):
    raise ConfigError(f"config.model.text_encoder_init={path!r} holds a vision encoder")
  if stored != wanted:
    diff = [f"{k}={v!r} (preset {model_config.text_encoder!r}: {getattr(wanted, k)!r})"
            for k, v in stored.to_dict().items() if v != wanted.to_dict()[k]]
    raise ConfigError(f"config.model.text_encoder_init={path!r} differs from "
                      f"config.model.text_encoder={model_config.text_encoder!r}: "
                      + ", ".join(diff))
  return autoencoder_parts.load_encoder_init(params, path, prefix="text_encoder")


def _host_value(variable) -> np.ndarray:
  """A replicated parameter's value on this host (multi-process safe)."""
  value = variable[...] if isinstance(variable, nnx.Variable) else variable
  return np.asarray(value.addressable_shards[0].data if isinstance(value, jax.Array) else value)


# --- the task ------------------------------------------------------------------------------

class T2ITask(Task):
  """Text-to-image generator training (docs/method.md#text-to-image-generator)."""

  frozen_params = r"^(text_encoder|encoder|svae|pixel_decoder|latent_norm)\."
  # The PS-VAE run gives its model section (config.model.autoencoder), its encoder, E_s (its
  # D_s is not part of this model) and pixel decoder, and its latent statistics.
  parent = ParentRun(task="psvae",
                     groups={"encoder": "encoder", "svae": "svae",
                             "pixel_decoder": "pixel_decoder"},
                     partial=("svae",), inherit={"model.autoencoder": "model"},
                     extras=("latent_stats",))

  def __init__(self, config):
    super().__init__(config)
    m = config.model
    self.tokenizer = build_tokenizer(m.tokenizer)
    text_config = text_encoder_config(m)
    if self.tokenizer.vocab_size > text_config.vocab_size:
      raise ConfigError(f"config.model.tokenizer={m.tokenizer!r} has {self.tokenizer.vocab_size} "
                        f"tokens, more than the text encoder's vocabulary "
                        f"({text_config.vocab_size}, preset {m.text_encoder!r})")
    # The empty caption: dropped captions and the unconditional branch of CFG.
    self.empty_ids, self.empty_mask = tokenize(self.tokenizer, [""], m.max_text_len)
    self.generator = generator_config(config)
    self.grid = latent_grid(m.autoencoder)
    f = config.flow
    self.train_shift = float(f.shift) or flow.resolution_shift(m.autoencoder.latent_channels,
                                                               m.patch_size)
    self._sample_fns: dict = {}

  def build_model(self, rngs: nnx.Rngs) -> T2IModel:
    return T2IModel(self.config, rngs=rngs, generator=self.generator)

  # --- init ------------------------------------------------------------------------------
  def check_fresh_start(self) -> None:
    if self.config.model.require_autoencoder:
      raise ConfigError("config.init is empty: T2I trains on a PS-VAE latent; pass "
                        "--config.init=<the PS-VAE run's workdir> (or set "
                        "config.model.require_autoencoder=False to use a random one)")

  def from_parent(self, params: nnx.State, parent_groups: set[str], extras: dict,
                  what: str) -> nnx.State:
    return set_latent_stats(params, extras.get("latent_stats"), what=what)

  def load_init(self, params: nnx.State, path: str) -> nnx.State:
    m = self.config.model
    if m.text_encoder_init:
      params = load_text_encoder(params, m.text_encoder_init, m)
    elif m.require_pretrained:
      raise ConfigError("config.model.text_encoder_init is empty: convert the Qwen2.5 checkpoint "
                        "once (python -m psvae_jax.tools.convert --src=HF_DIR --out=DIR) and pass "
                        "--config.model.text_encoder_init=DIR, or set "
                        "config.model.require_pretrained=False for a random text encoder")
    return params

  # --- data ------------------------------------------------------------------------------
  def prepare_batch(self, batch) -> dict[str, np.ndarray]:
    m = self.config.model
    cached = [k for k in CACHED_KEYS if k in batch]
    if m.cached_inputs:
      missing = [k for k in CACHED_KEYS if k not in batch]
      if missing:
        raise DataError(f"config.model.cached_inputs=True but the batch has no {missing} "
                        f"(fields: {sorted(batch)}); data.source must be a latent cache")
      out = {"latent": np.asarray(batch["latent"], np.float32),
             "text_states": np.asarray(batch["text_states"], np.float32),
             "text_mask": np.asarray(batch["text_mask"], np.int32)}
      self._check_cached(out)
      return out
    if cached:
      raise DataError(f"the batch carries cached {cached}: set config.model.cached_inputs=True "
                      "to train from them")
    if "caption" not in batch:
      raise DataError(f"data.source={self.config.data.source!r} yields no 'caption' (fields: "
                      f"{sorted(batch)}); T2I needs image-caption pairs")
    ids, mask = tokenize(self.tokenizer, batch["caption"], m.max_text_len)
    return {"image": np.asarray(batch["image"]), "input_ids": ids, "attention_mask": mask}

  def cached_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the cached inputs (CACHED_KEYS) of a batch of `batch_size` for this model."""
    m = self.config.model
    return {"latent": (batch_size, self.grid, self.grid, m.autoencoder.latent_channels),
            "text_states": (batch_size, m.max_text_len, text_encoder_config(m).width),
            "text_mask": (batch_size, m.max_text_len)}

  def _check_cached(self, batch) -> None:
    want = self.cached_shapes(batch["latent"].shape[0])
    bad = [f"{k} {batch[k].shape} (expected {v})" for k, v in want.items()
           if batch[k].shape != v]
    if bad:
      raise DataError("cached inputs do not fit this model (latent grid, channels, "
                      "config.model.max_text_len, text encoder width): " + ", ".join(bad))

  # --- conditioning ----------------------------------------------------------------------
  def latents(self, model: T2IModel, batch) -> jax.Array:
    """Normalised latents x0 of a batch: cached, or encoded from its images."""
    if "latent" in batch:
      return batch["latent"].astype(jnp.float32)
    return image_latents(model, batch["image"], self.config.model.autoencoder)

  def empty_text(self, model: T2IModel) -> tuple[jax.Array, jax.Array]:
    """Text states (1, L, D) and mask (1, L) of the empty caption."""
    ids, mask = jnp.asarray(self.empty_ids), jnp.asarray(self.empty_mask)
    return text_states(model, ids, mask), mask

  def text_condition(self, model: T2IModel, batch, drop: jax.Array | None = None):
    """(states (B, L, D) float32, mask (B, L) int32); rows where `drop` get the empty caption."""
    if "text_states" in batch:
      states = batch["text_states"].astype(jnp.float32)
      mask = batch["text_mask"].astype(jnp.int32)
      if drop is not None:
        empty_states, empty_mask = self.empty_text(model)
        states = jnp.where(drop[:, None, None], empty_states, states)
        mask = jnp.where(drop[:, None], empty_mask, mask)
      return states, mask
    ids, mask = batch["input_ids"], batch["attention_mask"].astype(jnp.int32)
    if drop is not None:
      ids = jnp.where(drop[:, None], jnp.asarray(self.empty_ids), ids)
      mask = jnp.where(drop[:, None], jnp.asarray(self.empty_mask), mask)
    return text_states(model, ids, mask), mask

  # --- training --------------------------------------------------------------------------
  def loss(self, model, batch, rng, step):
    f = self.config.flow
    rng_t, rng_noise, rng_drop = jax.random.split(rng, 3)
    x0 = self.latents(model, batch)
    b = x0.shape[0]
    drop = flow.caption_dropout_mask(rng_drop, b, f.caption_dropout)
    states, mask = self.text_condition(model, batch, drop)
    t = flow.sample_timesteps(rng_t, b, shift=self.train_shift, mean=f.timestep_mean,
                              std=f.timestep_std)
    noise = jax.random.normal(rng_noise, x0.shape, jnp.float32)
    per_example = flow_loss_per_example(model, x0, noise, t, states, mask)
    loss = jnp.mean(per_example)
    metrics = {"flow_loss": loss, "caption_dropped": jnp.mean(drop.astype(jnp.float32)),
               "t_mean": jnp.mean(t), "latent_std": jnp.std(x0)}
    return loss, metrics

  def evaluate(self, model, batch, rng):
    x0 = self.latents(model, batch)
    states, mask = self.text_condition(model, batch)
    noise = jax.random.normal(rng, x0.shape, jnp.float32)
    metrics, losses = {}, []
    for t in self.config.flow.eval_times:
      times = jnp.full((x0.shape[0],), float(t), jnp.float32)
      value = jnp.mean(flow_loss_per_example(model, x0, noise, times, states, mask))
      metrics[f"flow_loss_t{float(t):g}"] = value
      losses.append(value)
    if losses:
      metrics["flow_loss"] = jnp.mean(jnp.stack(losses))
    metrics["latent_mean"] = jnp.mean(x0)
    metrics["latent_std"] = jnp.std(x0)
    return metrics

  # --- sampling --------------------------------------------------------------------------
  def generate(self, model: T2IModel, batch, rng: jax.Array) -> jax.Array:
    """uint8 images (B, H, W, 3) for the batch's captions (or cached text states): Euler with
    config.flow's steps, inference shift and CFG scale; traceable (jit it)."""
    f, c = self.config.flow, self.generator
    states, mask = self.text_condition(model, batch)
    n = states.shape[0]
    guidance = None if float(f.cfg_scale) == 1.0 else float(f.cfg_scale)
    if guidance is not None:
      empty_states, empty_mask = self.empty_text(model)
      states = jnp.concatenate([jnp.broadcast_to(empty_states, states.shape), states])
      mask = jnp.concatenate([jnp.broadcast_to(empty_mask, mask.shape), mask])
    noise = jax.random.normal(rng, (n, self.grid, self.grid, c.in_channels), jnp.float32)
    x0 = flow.euler_sample(lambda x, t: velocity(model, x, t, states, mask), noise,
                           num_steps=f.sample_steps, shift=f.sample_shift,
                           guidance_scale=guidance)
    return unit_range_to_uint8(model.pixel_decoder(model.latent_norm.denormalize(x0)))

  def sample(self, model, rng, batch, step):
    """Generated images for the first config.flow.num_samples held-out captions, and the
    held-out images themselves when the batch has them ('samples_reference')."""
    n = min(int(self.config.flow.num_samples), next(iter(batch.values())).shape[0])
    keys = tuple(k for k in ("image", "input_ids", "attention_mask") + CACHED_KEYS
                 if k in batch)
    graphdef, state = nnx.split(model)
    fn = self._sample_fns.get((graphdef, n, keys))
    if fn is None:
      def run(state, batch, rng):
        part = {k: batch[k][:n] for k in keys}
        out = {"samples": self.generate(nnx.merge(graphdef, state), part, rng)}
        if "image" in part:
          out["samples_reference"] = part["image"]
        return out
      fn = self._sample_fns[(graphdef, n, keys)] = jax.jit(run)
    return fn(state, {k: batch[k] for k in keys}, rng)

  # --- bookkeeping -----------------------------------------------------------------------
  def flops_per_example(self) -> float:
    m = self.config.model
    flops = float(mmdit_train_flops(self.generator, 1, m.max_text_len))
    if not m.cached_inputs:
      flops += text_encoder_forward_flops(text_encoder_config(m), m.max_text_len)
      flops += autoencoder_parts.latent_encoder_forward_flops(m.autoencoder)
    return flops

  def checkpoint_extras(self, model) -> dict:
    """The latent statistics travel with every T2I checkpoint (for sampling tools)."""
    norm = model.latent_norm
    return {"latent_stats": {"mean": [float(v) for v in _host_value(norm.mean)],
                             "std": [float(v) for v in _host_value(norm.std)]}}
