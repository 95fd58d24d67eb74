"""The whole chain in one command: S-VAE -> PS-VAE -> T2I -> edit, each stage in its own
sub-workdir (WORKDIR/svae, WORKDIR/psvae, ...) initialised from the previous stage's workdir.
Re-running the same command resumes: finished stages are skipped, an interrupted one continues.

Smoke (CPU, S-VAE -> PS-VAE -> T2I -> edit with every stage's smoke preset, about 6 minutes
on 2 idle AVX2 cores; reconstruction grids under WORKDIR/{svae,psvae}/samples, generated images
under WORKDIR/t2i/samples, (source | edited | target) strips under WORKDIR/edit/samples):
  python -m psvae_jax.main --config=configs/pipeline.py:smoke --workdir=/tmp/psvae/pipeline

Toy (CPU, each stage's toy preset: S-VAE -> PS-VAE -> T2I on single-object synthetic scenes,
then edit on the synthetic edit world), then the compositional score of the T2I run and of a
random-init generator, and the edit success per kind:
  python -m psvae_jax.main --config=configs/pipeline.py:toy --workdir=/tmp/psvae/toy
  python -m psvae_jax.tools.eval_t2i --workdir=/tmp/psvae/toy/t2i
  python -m psvae_jax.tools.eval_t2i --workdir=/tmp/psvae/toy/t2i --random_init
  python -m psvae_jax.tools.eval_edit --workdir=/tmp/psvae/toy/edit --random_init
Expected (2-core CPU, idle, about 27 min to the end of T2I: S-VAE 1.6, PS-VAE 5.2, T2I 20.4
at about 6.5 step/s; the edit stage after it): eval_t2i score 0.91 (seed 0) / 0.91 (seed 1) over
180 prompts, colour 1.00, squares the weak class; random-init generator 0.00. PS-VAE eval PSNR
31.8 dB. The edit stage (12000 steps, about 80 min more): edit success recolour 1.00, add 0.85,
remove 0.95, move 0.85 (all 0.91; the unedited source 0; see configs/edit.py).

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
  suffix = {"": "", "smoke": ":smoke", "toy": ":toy"}
  if preset not in suffix:
    raise ValueError(f"unknown preset {preset!r} for configs/pipeline.py; known: '', 'smoke', "
                     "'toy'")
  tag = suffix[preset]
  # 'name=config[:preset]', run in this order; each stage's init defaults to the previous
  # stage's workdir.
  c.stages = (f"svae=configs/svae.py{tag}", f"psvae=configs/psvae.py{tag}",
              f"t2i=configs/t2i.py{tag}", f"edit=configs/edit.py{tag}")
  c.overrides = ()
  return c.lock()
