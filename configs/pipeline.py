"""The whole chain in one command: S-VAE -> PS-VAE -> T2I (-> edit), each stage in its own
sub-workdir (WORKDIR/svae, WORKDIR/psvae, ...) initialised from the previous stage's workdir.
Re-running the same command resumes: finished stages are skipped, an interrupted one continues.

Smoke (CPU; every stage's smoke preset; sample PNGs under WORKDIR/t2i/samples):
  python -m psvae_jax.main --config=configs/pipeline.py:smoke --workdir=/tmp/psvae/pipeline

Paper scale (each stage's paper preset; pass the converted encoder, LPIPS and text encoder):
  python -m psvae_jax.main --config=configs/pipeline.py --workdir=gs://BUCKET/run \
      --config.overrides="('svae.init=/ckpt/dinov2_b14_reg', \
                           'svae.model.lpips_weights=/ckpt/lpips', \
                           'psvae.model.lpips_weights=/ckpt/lpips')"
Stage-specific settings go in `overrides` as 'stage.key.path=value'.
"""
import ml_collections


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "pipeline"
  suffix = {"": "", "smoke": ":smoke"}
  if preset not in suffix:
    raise ValueError(f"unknown preset {preset!r} for configs/pipeline.py; known: '', 'smoke'")
  tag = suffix[preset]
  # 'name=config[:preset]', run in this order; each stage's init defaults to the previous
  # stage's workdir.
  c.stages = (f"svae=configs/svae.py{tag}", f"psvae=configs/psvae.py{tag}")
  c.overrides = ()
  return c.lock()
