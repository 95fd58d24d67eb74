"""Config sections of the autoencoder stages (S-VAE and PS-VAE), shared by their config files."""
import ml_collections


def model_config() -> ml_collections.ConfigDict:
  """`config.model` of the S-VAE and PS-VAE stages (paper defaults)."""
  m = ml_collections.ConfigDict()
  m.encoder = "dinov2_b14_reg"  # preset name of the representation encoder (models.encoders)
  m.encoder_resolution = 224  # pixels fed to the encoder (bicubic resize + mean/std)
  m.svae_depth = 3  # transformer blocks in E_s and in D_s
  m.latent_channels = 96
  m.init_from_encoder = False  # copy the encoder's last svae_depth blocks into E_s/D_s
  m.scan_layers = False  # scanned encoder / E_s / D_s blocks; unscanned weights still load
  m.remat = False
  m.require_pretrained_encoder = True  # scratch start without config.init is an error
  # Directory with LPIPS weights as safetensors: vgg16.safetensors (torchvision VGG16 state dict)
  # and lpips_vgg.safetensors (the lpips package's v0.1 heads). '' = random (smoke runs only).
  m.lpips_weights = ""
  m.pixel_decoder = ml_collections.ConfigDict(dict(
      ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), resolution=256,
      norm_groups=32))
  m.discriminator = ml_collections.ConfigDict(dict(enabled=True, ndf=64, n_layers=3))
  return m


def loss_config() -> ml_collections.ConfigDict:
  """`config.loss`: 1.0 L_s + pixel_weight L_P + kl_weight L_KL (+ the discriminator's loss)."""
  c = ml_collections.ConfigDict()
  c.semantic_weight = 1.0
  c.pixel_weight = 0.1
  c.kl_weight = 1e-6  # LDM kl-f16 convention (KL summed over latent dims, batch mean)
  c.perceptual_weight = 1.0  # LPIPS inside L_P (0 = L1 only; no VGG is built)
  c.pixel_reduction = "mean"  # 'mean' over H*W*C, or 'sum' (LDM's per-image sum)
  c.logvar_init = 0.0
  c.disc_weight = 0.5
  c.disc_factor = 1.0
  c.disc_start = 50_001  # the discriminator's loss switches on at this step
  return c


def smoke_overrides(c: ml_collections.ConfigDict) -> None:
  """Shrinks an autoencoder config to a CPU run of minutes (tiny random encoder, 64 px)."""
  c.model.encoder = "tiny"
  c.model.encoder_resolution = 56  # 4x4 tokens
  c.model.require_pretrained_encoder = False
  c.model.latent_channels = 16
  c.model.pixel_decoder.ch = 16
  c.model.pixel_decoder.ch_mult = (1, 1, 2, 2, 2)  # 4x4 -> 64x64
  c.model.pixel_decoder.num_res_blocks = 1
  c.model.pixel_decoder.attn_resolutions = (4,)
  c.model.pixel_decoder.resolution = 64
  c.model.pixel_decoder.norm_groups = 8
  c.model.discriminator.ndf = 16
  c.loss.perceptual_weight = 0.0  # random VGG weights would make LPIPS meaningless
  c.data.source = "synthetic:shapes"
  c.data.image_size = 64
  c.batch_size = 16
  c.optim.lr = 1e-3
  c.optim.ema_decay = 0.9  # short runs: EMA weights must move within tens of steps
  c.log_every = 10
  c.eval_batches = 2


def toy_overrides(c: ml_collections.ConfigDict) -> None:
  """The smoke shapes adapted to reconstruct single-object synthetic scenes cleanly enough for
  the synthetic detector (the toy text-to-image chain, configs/*.py:toy); L1 only (no LPIPS,
  no GAN)."""
  smoke_overrides(c)
  c.data.source = "synthetic:single"
  # A 16x16 latent (4 px per token): the decoder paints objects locally. From an 8x8 or 4x4
  # latent, L1 keeps drawing the empty grey background (the median of pixels an object rarely
  # covers) for well over a thousand steps.
  c.model.encoder_resolution = 224
  c.model.latent_channels = 8
  c.model.pixel_decoder.ch_mult = (1, 1, 2)  # 16x16 -> 64x64
  c.model.pixel_decoder.attn_resolutions = ()
  c.model.discriminator.enabled = False
  c.batch_size = 16
  c.optim.ema_decay = 0.99
  c.log_every = 50
