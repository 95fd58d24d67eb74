"""Text-to-image (docs/method.md#text-to-image-generator): an MMDiT generator (DDT head)
trained with rectified flow on the normalised PS-VAE latent, conditioned on a frozen Qwen2 text
encoder's last hidden state.

Smoke (CPU, a few minutes; chain S-VAE -> PS-VAE -> T2I, each smoke preset; the flow loss
falls and WORKDIR/samples/samples_<step>.png holds the decoded sample grid):
  python -m psvae_jax.main --config=configs/svae.py:smoke --workdir=/tmp/psvae/svae_smoke
  python -m psvae_jax.main --config=configs/psvae.py:smoke --workdir=/tmp/psvae/psvae_smoke \
      --config.init=/tmp/psvae/svae_smoke
  python -m psvae_jax.main --config=configs/t2i.py:smoke --workdir=/tmp/psvae/t2i_smoke \
      --config.init=/tmp/psvae/psvae_smoke
The smoke generator (tiny MMDiT, tiny random text encoder, byte tokenizer) only shows that the
chain trains and samples; its images are not meant to match the captions.

Paper scale (~650M generator incl. the 2048-wide DDT head; batch 730, lr 1e-4, EMA 0.9999, 200k
steps, 256 px). Convert Qwen2.5-0.5B once, write the image-caption corpus (CC12M-LLaVA-NeXT in
the paper) as ArrayRecord shards with the prepare tool, then:
  python -m psvae_jax.tools.convert --src=/models/Qwen2.5-0.5B --out=/ckpt/qwen2.5_0.5b
  python -m psvae_jax.main --config=configs/t2i.py --workdir=gs://BUCKET/t2i \
      --config.init=gs://BUCKET/psvae \
      --config.model.text_encoder_init=/ckpt/qwen2.5_0.5b \
      --config.model.tokenizer=/models/Qwen2.5-0.5B \
      --config.data.source='arrayrecord:/data/cc12m_llava_next/train-*.arrayrecord'
Expected (paper, PS-VAE 96c latent): GenEval 76.56, DPG-Bench 83.62.
The global batch must divide by the data-parallel size: 730 suits 1, 2, 5 or 10-way data
parallelism; on 8 / 16 / 32 devices pass e.g. --config.batch_size=736.
Training on cached latents and text states (the cache tool's shards): add
--config.model.cached_inputs=True and point data.source at the cache.

Toy (CPU; the whole chain on single-object scenes, then its compositional score; see
configs/pipeline.py:toy for the one-command version and the expected numbers):
  python -m psvae_jax.main --config=configs/pipeline.py:toy --workdir=/tmp/psvae/toy
  python -m psvae_jax.tools.eval_t2i --workdir=/tmp/psvae/toy/t2i
Samples for your own prompts (one PNG; --prompts=FILE --out=DIR for one PNG per line):
  python -m psvae_jax.tools.sample --workdir=/tmp/psvae/toy/t2i --prompt="a red circle" \
      --out=/tmp/psvae/red_circle.png

Presets: '' (paper base, ~650M), 'large' (~1.7B), 'smoke' (CPU), 'toy' (CPU, scored);
'tpu_v5p', 'tpu_v6e', 'large_tpu_v5p', 'large_tpu_v6e': the paper base / large on a TPU slice
(bf16 compute, batch 768, splash attention; data parallel on v5p, FSDP on v6e;
psvae_jax/tpu_presets.py).
"""
import ml_collections

from psvae_jax import tpu_presets
from psvae_jax.config_base import base_config
from psvae_jax.tasks import autoencoder_config

# config.model.autoencoder: the PS-VAE's model section, as far as it decides its shapes. The
# default for a start without config.init; with it the PS-VAE run's stored model section
# replaces this one (its `remat` stays this run's).
_AUTOENCODER_KEYS = ("encoder", "encoder_resolution", "svae_depth", "latent_channels",
                     "scan_layers", "remat", "pixel_decoder")


def _autoencoder_section(preset: str = "") -> ml_collections.ConfigDict:
  """The model section of configs/psvae.py ('' paper, 'smoke' or 'toy'), limited to
  _AUTOENCODER_KEYS."""
  c = base_config("psvae")
  c.model = autoencoder_config.model_config()
  c.loss = autoencoder_config.loss_config()
  if preset == "toy":
    autoencoder_config.toy_overrides(c)
  elif preset == "smoke":
    autoencoder_config.smoke_overrides(c)
  return ml_collections.ConfigDict({k: c.model[k] for k in _AUTOENCODER_KEYS})


def model_config() -> ml_collections.ConfigDict:
  """`config.model` (paper base)."""
  m = ml_collections.ConfigDict()
  # MMDiT preset (psvae_jax.models.mmdit.PRESETS: 'tiny', 'base' ~650M, 'large' ~1.7B); its
  # latent channels, latent grid and text width follow the autoencoder and the text encoder.
  m.generator = "base"
  m.ddt_head = True  # RAE's wide DDT head (the preset's shape; 2 blocks x 2048 for base/large)
  m.patch_size = 1
  m.qk_norm = "rms_norm"  # or '' for none
  m.pos_embed = "sincos"  # or 'learned'
  m.causal_text = False  # text tokens attend only to earlier text tokens
  # nnx.scan over the generator's (and DDT head's) blocks and the text encoder's layers;
  # converted or parent-run weights in either layout load (models/scan_layout.py)
  m.scan_layers = False
  m.remat_policy = ""  # '' | 'full' | 'dots' | 'dots_no_batch'
  # Frozen text encoder: preset name (psvae_jax.models.text_encoder.PRESETS), its converted
  # weights (python -m psvae_jax.tools.convert) and the tokenizer ('bytes' or a local HF
  # tokenizer directory).
  m.text_encoder = "qwen2.5-0.5b"
  m.text_encoder_init = ""
  m.tokenizer = ""
  m.max_text_len = 256  # tokens incl. the end-of-text token; longer captions are cut
  # A fresh start without text_encoder_init is an error unless this is False.
  m.require_pretrained = True
  # A fresh start without config.init (the PS-VAE run) is an error unless this is False.
  m.require_autoencoder = True
  # True: data.source yields cached 'latent' / 'text_states' / 'text_mask' arrays (the frozen
  # encoders are then not run, nor counted in FLOPs).
  m.cached_inputs = False
  m.autoencoder = _autoencoder_section()
  return m


def flow_config() -> ml_collections.ConfigDict:
  """`config.flow`: rectified-flow training, eval and sampling settings."""
  f = ml_collections.ConfigDict()
  f.shift = 0.0  # training time shift; 0 = sqrt(C P^2 / 16) of the latent (96 ch, P 1: 2.449)
  f.timestep_mean = 0.0  # t ~ sigmoid(N(mean, std^2)) before the shift
  f.timestep_std = 1.0
  f.caption_dropout = 0.1  # dropped captions become '' (classifier-free guidance)
  f.eval_times = (0.1, 0.3, 0.5, 0.7, 0.9)  # eval: flow loss at these fixed t
  f.sample_steps = 50  # Euler steps
  f.sample_shift = 3.0  # inference time shift
  f.cfg_scale = 6.5  # classifier-free guidance (1 = none)
  f.num_samples = 8  # held-out captions sampled for the logged grid
  return f


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  preset, tpu_chip = tpu_presets.split(preset)
  c = base_config("t2i")
  c.model = model_config()
  c.flow = flow_config()

  c.data.source = "arrayrecord:/data/cc12m_llava_next/train-*.arrayrecord"  # placeholder
  c.data.image_size = 256
  c.batch_size = 730
  c.total_steps = 200_000
  c.optim.lr = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.9999
  c.log_every = 100
  c.eval_every = 5_000
  c.sample_every = 5_000
  c.checkpoint_every = 5_000
  c.checkpoint.keep_every = 50_000

  if preset == "large":
    c.model.generator = "large"
  elif preset in ("smoke", "toy"):
    # Tiny MMDiT, random frozen tiny text encoder, byte tokens, synthetic 64 px scenes.
    c.model.generator = "tiny"
    c.model.text_encoder = "tiny"
    c.model.tokenizer = "bytes"
    c.model.require_pretrained = False
    c.model.autoencoder = _autoencoder_section(preset)  # = configs/psvae.py:<preset>
    c.data.image_size = 64
    c.optim.lr = 1e-3
    c.sample_every = 0  # the sample grid is written at the end
    if preset == "smoke":
      c.model.max_text_len = 144  # the longest synthetic caption (143 bytes) + end of text
      c.data.source = "synthetic:shapes"
      c.batch_size = 16
      c.total_steps = 40
      c.optim.ema_decay = 0.9  # short run: the EMA must move within tens of steps
      c.log_every = 10
      c.eval_every = 20
      c.eval_batches = 2
      c.checkpoint_every = 20
    else:  # single-object scenes, scored by `python -m psvae_jax.tools.eval_t2i`
      c.model.max_text_len = 40  # the longest single-object caption (38 bytes) + end of text
      c.data.source = "synthetic:single"
      # 4 layers of width 128 on 2x2 latent patches (8x8 tokens): the tiny preset on 16x16
      # tokens still drew blobs, not shapes, after 1000-2000 steps; this one is faster too.
      c.model.generator = "small"
      c.model.patch_size = 2
      c.batch_size = 16
      # No DDT head (the paper's default has one): on this world it scores lower and trains
      # slower (docs/method.md#the-toy-chain).
      c.model.ddt_head = False
      # Cosine decay from 2e-3: reaches a constant 1e-3's score in fewer steps.
      c.total_steps = 8000
      c.optim.lr = 2e-3
      c.optim.schedule = "cosine"
      c.optim.warmup_steps = 250
      c.optim.ema_decay = 0.99
      # sqrt(C P^2 / 16) would be 1.41 here: too little training near noise, where the number
      # and place of objects is decided (at shift 1 samples scatter fragments after 500 steps).
      # Shift 3 leaves under 3% of the steps at t < 0.3, where edges and corners are drawn
      # (squares came out with ragged edges); shift 2 gives them 6%.
      c.flow.shift = 2.0
      c.flow.sample_steps = 25
      c.flow.cfg_scale = 3.0
      c.log_every = 100
      c.eval_every = 0
      c.checkpoint_every = 500
  elif preset:
    raise ValueError(f"unknown preset {preset!r} for configs/t2i.py; known: '', 'large', "
                     "'smoke', 'toy'")
  if tpu_chip:
    tpu_presets.apply(c, tpu_chip)
  return c.lock()
