"""Instruction-based image editing (docs/method.md#editing): the T2I MMDiT continues training
with the clean source image's latent tokens concatenated to the noisy target tokens in its image
stream and the instruction as its text (psvae_jax/tasks/edit.py), initialised from a T2I run.

Smoke (CPU, a few minutes; chain S-VAE -> PS-VAE -> T2I -> edit, each smoke preset; the flow
loss falls and WORKDIR/samples/samples_<step>.png holds (source | edited | target) strips):
  python -m psvae_jax.main --config=configs/svae.py:smoke --workdir=/tmp/psvae/svae_smoke
  python -m psvae_jax.main --config=configs/psvae.py:smoke --workdir=/tmp/psvae/psvae_smoke \
      --config.init=/tmp/psvae/svae_smoke
  python -m psvae_jax.main --config=configs/t2i.py:smoke --workdir=/tmp/psvae/t2i_smoke \
      --config.init=/tmp/psvae/psvae_smoke
  python -m psvae_jax.main --config=configs/edit.py:smoke --workdir=/tmp/psvae/edit_smoke \
      --config.init=/tmp/psvae/t2i_smoke
The smoke edits are not meant to follow the instructions (40 steps).

Toy (CPU; the last stage of configs/pipeline.py:toy: the toy T2I model continues on the
synthetic edit world at 64 px (recolour / add / remove / move one object), its tiny random text
encoder trained along; then the per-kind success of held-out edits beside the unedited source,
the autoencoder reconstruction and a random-init generator):
  python -m psvae_jax.main --config=configs/pipeline.py:toy --workdir=/tmp/psvae/toy
  python -m psvae_jax.tools.eval_edit --workdir=/tmp/psvae/toy/edit --random_init
or on its own from a finished toy T2I run:
  python -m psvae_jax.main --config=configs/edit.py:toy --workdir=/tmp/psvae/toy_edit \
      --config.init=/tmp/psvae/toy/t2i
Expected (target: recolour success >= 0.7). Measured on this preset after its 12000 steps from
the 8000-step toy T2I run of configs/t2i.py:toy (no DDT head; 20 held-out edits per kind, cfg 3 /
image cfg 1.5): recolour 1.00, add 0.85, remove 0.95, move 0.85 (all 0.91); the unedited source
and the reconstruction 0 for every kind. The runs behind the toy settings:
docs/method.md#the-toy-chain.

Paper scale (T2I settings: batch 730, lr 1e-4, EMA 0.9999; 50k steps from the T2I checkpoint;
OmniEdit, 1.2M pairs, written as ArrayRecord shards once):
  python -m psvae_jax.tools.prepare --format=omniedit_parquet --input=/data/OmniEdit-Filtered \
      --out=/data/omniedit
  python -m psvae_jax.main --config=configs/edit.py --workdir=gs://BUCKET/edit \
      --config.init=gs://BUCKET/t2i --config.model.tokenizer=/models/Qwen2.5-0.5B \
      --config.data.source='arrayrecord:/data/omniedit/train-*.array_record'
  python -m psvae_jax.tools.gedit --workdir=gs://BUCKET/edit --bench=/data/GEdit-Bench \
      --out=/tmp/gedit_edit
Expected (paper, PS-VAE 96c): EditReward 0.222 on the 8 GEdit-Bench subtasks (the images of
--subtasks=paper, scored outside this project from the --out layout). config.model must equal
the T2I run's (checked at init; model.autoencoder is read from the T2I run's stored config).

Presets: '' (paper base), 'large' (~1.7B generator), 'smoke' (CPU), 'toy' (CPU, measured).
"""
import os

import ml_collections

from psvae_jax.config_loader import load_config

# Keys of the T2I model section that editing does not use: every weight comes from the T2I run.
_T2I_ONLY = ("text_encoder_init", "require_pretrained", "require_autoencoder", "cached_inputs")
_T2I_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "t2i.py")


def _from_t2i(preset: str) -> ml_collections.ConfigDict:
  """configs/t2i.py[:preset] as an editable copy with task 'edit' and the edit keys."""
  c = ml_collections.ConfigDict(
      load_config(f"{_T2I_CONFIG}:{preset}" if preset else _T2I_CONFIG).to_dict())
  c.task = "edit"
  for key in _T2I_ONLY:
    del c.model[key]
  # A fresh start without config.init (the T2I run) is an error unless this is False.
  c.model.require_init = True
  # Train the text encoder with the generator (default frozen, as the paper's Qwen2.5).
  c.model.train_text_encoder = False
  # > 0: a learned per-cell code shared by the target and the source token of each latent cell
  # (psvae_jax.models.mmdit.MMDiTConfig.edit_position_std), drawn from N(0, std^2).
  c.model.edit_position_std = 0.0
  # Condition dropout, exclusive events per example (InstructPix2Pix: 5% each): the
  # instruction alone, the source alone, both. They train the guidance branches.
  c.flow.caption_dropout = 0.05
  c.flow.source_dropout = 0.05
  c.flow.joint_dropout = 0.05
  # Two-scale guidance: v = v(-,-) + image_cfg_scale (v(src,-) - v(-,-))
  #                         + cfg_scale (v(src,txt) - v(src,-)).
  # Decision (the paper gives none for editing): InstructPix2Pix's image scale 1.5 with the
  # T2I text scale.
  c.flow.image_cfg_scale = 1.5
  return c


def _synthetic_edits(c: ml_collections.ConfigDict) -> None:
  c.data.source = "synthetic:edits"
  c.data.image_size = 64
  c.model.max_text_len = 72  # the longest synthetic instruction (70 bytes) + end of text


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  if preset not in ("", "large", "smoke", "toy"):
    raise ValueError(f"unknown preset {preset!r} for configs/edit.py; known: '', 'large', "
                     "'smoke', 'toy'")
  c = _from_t2i(preset)
  # Paper: 50k steps from the T2I checkpoint with the T2I settings (batch, lr, EMA, sampling).
  c.data.source = "arrayrecord:/data/omniedit/train-*.array_record"  # placeholder
  c.total_steps = 50_000
  if preset == "smoke":
    _synthetic_edits(c)
    c.total_steps = 40
    c.flow.sample_steps = 20
  elif preset == "toy":
    # The toy T2I model (configs/t2i.py:toy: 16x16x8 latent, the small MMDiT on 2x2 patches,
    # no DDT head, trained at shift 2) continues on the edit world.
    _synthetic_edits(c)
    c.batch_size = 16
    # 12000 steps: the t = 0.9 eval loss (where the source matters most) and the remove success
    # still improve until then (docs/method.md#the-toy-chain).
    c.total_steps = 12000
    c.optim.lr = 2e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 100
    c.optim.ema_decay = 0.99
    c.log_every = 100
    c.eval_every = 1500
    c.checkpoint_every = 1500
    # Per-cell codes shared by target and source tokens: they lower the t = 0.9 eval loss.
    c.model.edit_position_std = 0.5
    c.eval_batches = 2
    c.flow.sample_steps = 20
    c.flow.cfg_scale = 3.0  # 6.5 over-guides this small model (edits lose the source)
    # Training time shift 6 (the toy T2I's 2 leaves 7% of the steps at t > 0.9): the colour a
    # recolour applies is only decided near pure noise; below t = 0.9 the noisy target already
    # shows it. At shift 2 the edits copy the source and ignore the colour.
    c.flow.shift = 6.0
    # The tiny text encoder is random (no pretrained one of that size): frozen, its states of
    # different colour words are nearly parallel and the generator changes colours at random;
    # trained with the generator it learns them.
    c.model.train_text_encoder = True
  return c.lock()
