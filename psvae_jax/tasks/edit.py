"""Instruction-based image editing (docs/method.md#editing): the T2I generator, initialised
from a T2I run, learns to produce the target image's latent given the source image's latent and
an instruction.

Sequence concatenation (not channel concatenation): the image stream of the MMDiT holds
  [noisy target latent tokens (x_t), clean source latent tokens]
with full attention among all image tokens (and the text tokens). Source tokens get the same 2D
position embedding as the target tokens of the same grid cell plus a learned source embedding
(`MMDiT.source_embedding`, a new parameter; it starts small, 0.02 * N(0, 1)); they share
the image stream's weights and timestep modulation. With config.model.edit_position_std > 0 a
learned code per latent cell (`MMDiT.edit_positions`, also new) is added to the target and the
source token of that cell, so that a target token can find its own cell's source token (the
sincos embedding barely separates neighbouring cells). The instruction is the text stream.
  x0 = latents of the target image, s = latents of the source image (both normalised as in T2I)
  x_t = (1 - t) x0 + t eps     (the source is never noised)
  loss = MSE(v(x_t, t, s, instruction) - (eps - x0)) over the TARGET tokens only: the
         generator returns only the target positions, so source-token outputs carry no loss.

Dropout for classifier-free guidance over both conditions (InstructPix2Pix): per example, with
probability flow.caption_dropout the instruction alone becomes the empty text, with
flow.source_dropout the source alone is hidden from attention (`source_mask` False: the output
then equals a call without source), with flow.joint_dropout both.
Sampling (Euler, flow.sample_steps / sample_shift) combines three velocities, chained as
InstructPix2Pix does (psvae_jax.flow.guidance_combine):
  v = v(-, -) + s_img (v(src, -) - v(-, -)) + s_txt (v(src, txt) - v(src, -))
with s_img = flow.image_cfg_scale and s_txt = flow.cfg_scale; '-' is the empty text / the hidden
source. s_img = s_txt = 1 gives the plain conditional v(src, txt) (one evaluation); s_img = 1
alone gives text guidance with the source, v(src, -) + s_txt (v(src, txt) - v(src, -)).

Initialisation (`config.init` = the T2I run's workdir): the generator from the run's EMA weights,
the text encoder, the PS-VAE encoder / E_s / pixel decoder and the latent statistics from its
(frozen) parameters, config.model.autoencoder from its stored config; the rest of config.model
must describe the same model (checked, differences named).
The text encoder stays frozen (docs/method.md: a pretrained Qwen2.5) unless
config.model.train_text_encoder, which trains it with the generator (toy runs, whose tiny text
encoder is random: frozen, its states hardly tell the colour words apart).
Without a source image (`generate` on a caption batch) the edit model samples text-to-image.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psvae_jax import flow
from psvae_jax.config_base import ConfigError
from psvae_jax.data.errors import DataError
from psvae_jax.models import mmdit
from psvae_jax.models.flops import mmdit_train_flops, text_encoder_forward_flops
from psvae_jax.tasks import autoencoder_parts
from psvae_jax.tasks import t2i
from psvae_jax.tasks.autoencoder import unit_range_to_uint8
from psvae_jax.tasks.base import ParentRun
from psvae_jax.tokenizers import tokenize

# Parameter groups taken from the T2I run.
_FROM_T2I = ("generator", "text_encoder", "encoder", "svae", "pixel_decoder", "latent_norm")


# --- velocities ----------------------------------------------------------------------------

def edit_velocity(model, x_t, t, states, mask, source, source_mask=None) -> jax.Array:
  """The generator's velocity for the target latents x_t given the clean source latents
  (B, h, w, C) and the instruction; `source_mask` (B,) False hides an example's source."""
  return model.generator.velocity(x_t, t, states, mmdit.mean_pool(states, mask), text_mask=mask,
                                  source_latents=source, source_mask=source_mask)


def edit_loss_per_example(model, x0, source, noise, t, states, mask,
                          source_mask=None) -> jax.Array:
  """Mean squared velocity error over the target latent elements, (B,). Only x0 is noised."""
  v = edit_velocity(model, flow.noisy_latents(x0, noise, t), t, states, mask, source, source_mask)
  return jnp.mean(jnp.square(v - flow.velocity_target(x0, noise)), axis=(1, 2, 3))


def condition_dropout(rng: jax.Array, batch: int, text: float, source: float,
                      joint: float) -> tuple[jax.Array, jax.Array]:
  """(drop_text, drop_source) booleans (B,): exclusive events of probability `text` (text only),
  `source` (source only) and `joint` (both), as InstructPix2Pix trains its guidance."""
  u = jax.random.uniform(rng, (batch,))
  only_text = u < text
  only_source = (u >= text) & (u < text + source)
  both = (u >= text + source) & (u < text + source + joint)
  return only_text | both, only_source | both


def cfg_groups(text_scale: float, image_scale: float, *, minimal: bool = True):
  """The velocity groups of the two-scale guidance and their scales.

  Returns (groups, scales): groups is a tuple of (text on, source on) pairs in the order
  `flow.guidance_combine` chains them, scales None (one group, no guidance), a float (two
  groups) or a pair. minimal=False always evaluates the three groups of the full formula.
  """
  text_scale, image_scale = float(text_scale), float(image_scale)
  if minimal and image_scale == 1.0:
    if text_scale == 1.0:
      return ((True, True),), None
    return ((False, True), (True, True)), text_scale
  return ((False, False), (False, True), (True, True)), (image_scale, text_scale)


def guided_velocity(model, x, t, states, mask, empty_states, empty_mask, source, *,
                    text_scale: float, image_scale: float, minimal: bool = True) -> jax.Array:
  """v = v(-,-) + s_img (v(src,-) - v(-,-)) + s_txt (v(src,txt) - v(src,-)), every group in
  one batched call. x (B, h, w, C), t () or (B,), states/mask the instruction's, empty_* the
  empty text's ((1, L, D) / (1, L)), source (B, h, w, C)."""
  groups, scales = cfg_groups(text_scale, image_scale, minimal=minimal)
  b = x.shape[0]
  g = len(groups)
  empty_states = jnp.broadcast_to(empty_states, states.shape)
  empty_mask = jnp.broadcast_to(empty_mask, mask.shape)
  group_states = jnp.concatenate([states if txt else empty_states for txt, _ in groups])
  group_mask = jnp.concatenate([mask if txt else empty_mask for txt, _ in groups])
  source_mask = jnp.concatenate([jnp.full((b,), src) for _, src in groups])
  tile = lambda a: jnp.concatenate([a] * g) if g > 1 else a
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
  v = edit_velocity(model, tile(x), tile(t), group_states, group_mask, tile(source),
                    None if g == 1 else source_mask)
  if scales is None:
    return v
  return flow.guidance_combine(v.reshape((g, b) + x.shape[1:]), jnp.asarray(scales))


# --- the task ------------------------------------------------------------------------------

class EditTask(t2i.T2ITask):
  """Instruction-based editing on the PS-VAE latent (sequence-concatenated source tokens)."""

  # The T2I run gives its autoencoder section and every parameter group; the generator's
  # source embedding and cell codes are new. The other config.model keys below must equal the
  # run's (shapes, layout or behaviour of what is loaded).
  parent = ParentRun(task="t2i", groups={g: g for g in _FROM_T2I},
                     new_entries={"generator": ("source_embedding", "edit_positions")},
                     inherit={"model.autoencoder": "model.autoencoder"},
                     match=("generator", "ddt_head", "patch_size", "qk_norm", "pos_embed",
                            "causal_text", "scan_layers", "text_encoder", "tokenizer"))

  def __init__(self, config):
    super().__init__(config)
    f = config.flow
    probs = {k: float(f[k]) for k in ("caption_dropout", "source_dropout", "joint_dropout")}
    bad = [f"flow.{k}={v}" for k, v in probs.items() if not 0.0 <= v <= 1.0]
    if bad or sum(probs.values()) > 1.0:
      raise ConfigError(f"condition dropout probabilities must be in [0, 1] and sum to <= 1 "
                        f"(they are exclusive events): {probs}")
    # Runs written before config.model.edit_position_std existed had none.
    self.generator = dataclasses.replace(
        self.generator, edit=True,
        edit_position_std=float(config.model.get("edit_position_std", 0.0)))
    if config.model.train_text_encoder:
      # The text encoder trains with the generator (toy runs, whose text encoder is random).
      self.frozen_params = r"^(encoder|svae|pixel_decoder|latent_norm)\."
    self._edit_fns: dict = {}

  # --- init ------------------------------------------------------------------------------
  def check_fresh_start(self) -> None:
    if self.config.model.require_init:
      raise ConfigError("config.init is empty: editing starts from a T2I run; pass "
                        "--config.init=<the T2I run's workdir> (or set "
                        "config.model.require_init=False for random weights)")

  def from_parent(self, params: nnx.State, parent_groups: set[str], extras: dict,
                  what: str) -> nnx.State:
    return params  # the latent statistics are the T2I run's frozen latent_norm

  def load_init(self, params: nnx.State, path: str) -> nnx.State:
    return params  # everything pretrained comes from the T2I run

  # --- data ------------------------------------------------------------------------------
  def prepare_batch(self, batch) -> dict[str, np.ndarray]:
    cached = [k for k in t2i.CACHED_KEYS if k in batch]
    if cached:
      raise DataError(f"the batch carries cached {cached}: editing trains from images "
                      "(source_image, image) and instructions")
    missing = [k for k in ("source_image", "image", "instruction") if k not in batch]
    if missing:
      raise DataError(f"data.source={self.config.data.source!r} yields no {missing} (fields: "
                      f"{sorted(batch)}); editing needs edit triplets (source_image, image = "
                      "target, instruction), e.g. synthetic:edits or shards written by the "
                      "prepare tool's edit formats")
    ids, mask = tokenize(self.tokenizer, batch["instruction"], self.config.model.max_text_len)
    return {"image": np.asarray(batch["image"]), "source_image": np.asarray(batch["source_image"]),
            "input_ids": ids, "attention_mask": mask}

  def text_condition(self, model, batch, drop: jax.Array | None = None):
    """As T2ITask.text_condition; with config.model.train_text_encoder the states keep their
    gradient (the text encoder trains)."""
    if not self.config.model.train_text_encoder:
      return super().text_condition(model, batch, drop)
    ids, mask = batch["input_ids"], batch["attention_mask"].astype(jnp.int32)
    if drop is not None:
      ids = jnp.where(drop[:, None], jnp.asarray(self.empty_ids), ids)
      mask = jnp.where(drop[:, None], jnp.asarray(self.empty_mask), mask)
    return model.text_encoder(ids, mask).astype(jnp.float32), mask

  def source_latents(self, model, batch) -> jax.Array:
    """Normalised latents of the batch's source images."""
    return t2i.image_latents(model, batch["source_image"], self.config.model.autoencoder)

  def _target_and_source(self, model, batch) -> tuple[jax.Array, jax.Array]:
    # An encoder pass each: one over their concatenation would, with the batch split over
    # devices, put targets and sources on different devices and move the latents to split them.
    return tuple(t2i.image_latents(model, batch[key], self.config.model.autoencoder)
                 for key in ("image", "source_image"))

  # --- training --------------------------------------------------------------------------
  def loss(self, model, batch, rng, step):
    f = self.config.flow
    rng_t, rng_noise, rng_drop = jax.random.split(rng, 3)
    x0, source = self._target_and_source(model, batch)
    b = x0.shape[0]
    drop_text, drop_source = condition_dropout(rng_drop, b, f.caption_dropout, f.source_dropout,
                                               f.joint_dropout)
    states, mask = self.text_condition(model, batch, drop_text)
    t = flow.sample_timesteps(rng_t, b, shift=self.train_shift, mean=f.timestep_mean,
                              std=f.timestep_std)
    noise = jax.random.normal(rng_noise, x0.shape, jnp.float32)
    loss = jnp.mean(edit_loss_per_example(model, x0, source, noise, t, states, mask,
                                          ~drop_source))
    metrics = {"flow_loss": loss, "text_dropped": jnp.mean(drop_text.astype(jnp.float32)),
               "source_dropped": jnp.mean(drop_source.astype(jnp.float32)),
               "t_mean": jnp.mean(t), "latent_std": jnp.std(x0)}
    return loss, metrics

  def evaluate(self, model, batch, rng):
    x0, source = self._target_and_source(model, batch)
    states, mask = self.text_condition(model, batch)
    noise = jax.random.normal(rng, x0.shape, jnp.float32)
    metrics, losses = {}, []
    for t in self.config.flow.eval_times:
      times = jnp.full((x0.shape[0],), float(t), jnp.float32)
      value = jnp.mean(edit_loss_per_example(model, x0, source, noise, times, states, mask))
      metrics[f"flow_loss_t{float(t):g}"] = value
      losses.append(value)
    if losses:
      metrics["flow_loss"] = jnp.mean(jnp.stack(losses))
    # How far the target is from the source: the loss of predicting "no edit" is this scale.
    metrics["source_target_mse"] = jnp.mean(jnp.square(x0 - source))
    return metrics

  # --- sampling --------------------------------------------------------------------------
  def generate(self, model, batch, rng, *, text_scale: float | None = None,
               image_scale: float | None = None, num_steps: int | None = None) -> jax.Array:
    """uint8 edited images (B, H, W, 3) of batch['source_image'] following the batch's
    instructions (input_ids / attention_mask); traceable (jit it). Without 'source_image' the
    batch's captions are sampled text-to-image (T2ITask.generate). Scales and steps default to
    config.flow's cfg_scale (text), image_cfg_scale and sample_steps."""
    if "source_image" not in batch:
      return super().generate(model, batch, rng)
    f = self.config.flow
    states, mask = self.text_condition(model, batch)
    empty_states, empty_mask = self.empty_text(model)
    source = self.source_latents(model, batch)
    noise = jax.random.normal(rng, source.shape, jnp.float32)
    scales = dict(text_scale=f.cfg_scale if text_scale is None else text_scale,
                  image_scale=f.image_cfg_scale if image_scale is None else image_scale)
    x0 = flow.euler_sample(
        lambda x, t: guided_velocity(model, x, t, states, mask, empty_states, empty_mask,
                                     source, **scales),
        noise, num_steps=f.sample_steps if num_steps is None else num_steps,
        shift=f.sample_shift)
    return unit_range_to_uint8(model.pixel_decoder(model.latent_norm.denormalize(x0)))

  def edit(self, model, source_images: np.ndarray, instructions, *, seed: int = 0,
           batch_size: int = 8, text_scale: float | None = None,
           image_scale: float | None = None, num_steps: int | None = None) -> np.ndarray:
    """Host API: uint8 (N, S, S, 3) source images at the run's image size + N instructions ->
    uint8 edited images. Batches of `batch_size` (the last one padded); example i uses the
    noise key fold_in(key(seed), i // batch_size)."""
    source_images = np.asarray(source_images)
    size = self.config.data.image_size
    if source_images.dtype != np.uint8 or source_images.shape[1:] != (size, size, 3):
      raise ValueError(f"source images must be uint8 (N, {size}, {size}, 3) (the run's "
                       f"image size), got {source_images.dtype} {source_images.shape}")
    instructions = [str(s) for s in instructions]
    if len(instructions) != len(source_images):
      raise ValueError(f"{len(source_images)} source images but {len(instructions)} "
                       "instructions")
    graphdef, state = nnx.split(model)
    key = (graphdef, batch_size, text_scale, image_scale, num_steps)
    fn = self._edit_fns.get(key)
    if fn is None:
      def run(state, batch, rng):
        return self.generate(nnx.merge(graphdef, state), batch, rng, text_scale=text_scale,
                             image_scale=image_scale, num_steps=num_steps)
      fn = self._edit_fns[key] = jax.jit(run)
    out = []
    for i, start in enumerate(range(0, len(source_images), batch_size)):
      images = source_images[start:start + batch_size]
      texts = instructions[start:start + batch_size]
      n = len(images)
      pad = batch_size - n
      ids, mask = tokenize(self.tokenizer, texts + [""] * pad, self.config.model.max_text_len)
      images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
      batch = {"source_image": images, "input_ids": ids, "attention_mask": mask}
      edited = fn(state, batch, jax.random.fold_in(jax.random.key(seed), i))
      out.append(np.asarray(jax.device_get(edited))[:n])
    return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8)

  def sample(self, model, rng, batch, step):
    """(source | edited | target) strips of the first config.flow.num_samples held-out
    edits, as 'samples'."""
    n = min(int(self.config.flow.num_samples), next(iter(batch.values())).shape[0])
    keys = ("image", "source_image", "input_ids", "attention_mask")
    graphdef, state = nnx.split(model)
    fn = self._sample_fns.get((graphdef, n))
    if fn is None:
      def run(state, batch, rng):
        part = {k: batch[k][:n] for k in keys}
        edited = self.generate(nnx.merge(graphdef, state), part, rng)
        return {"samples": jnp.concatenate([part["source_image"], edited, part["image"]],
                                           axis=2)}
      fn = self._sample_fns[(graphdef, n)] = jax.jit(run)
    return fn(state, {k: batch[k] for k in keys}, rng)

  # --- bookkeeping -----------------------------------------------------------------------
  def flops_per_example(self) -> float:
    m = self.config.model
    tokens = (self.grid // m.patch_size) ** 2
    flops = float(mmdit_train_flops(self.generator, 1, m.max_text_len, source_tokens=tokens))
    flops += text_encoder_forward_flops(t2i.text_encoder_config(m), m.max_text_len)
    flops += 2 * autoencoder_parts.latent_encoder_forward_flops(m.autoencoder)  # target and source
    return flops
