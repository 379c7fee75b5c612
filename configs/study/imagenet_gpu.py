"""The paper's training-scaling study on one 8-GPU node (docs/study.md): VTP against the
reconstruction-only autoencoder, VTP-L encoder with a 4-layer ViT-L pixel decoder (spec 3.2, the
scaling studies' configuration), four training lengths; LightningDiT-B for 80 ImageNet epochs on
each tokenizer's latents; gFID on 10k samples.

    python -m vtp_jax.study --config=configs/study/imagenet_gpu.py --workdir=runs/study_in1k \\
        --config.data_source=arrayrecord:/data/datacomp/*.array_record \\
        --config.fid_weights=fid_inception.npz

The paper's batch (16,384 image-text pairs, 4,096 SSL, 2,048 reconstruction) fits one 8 x H200
node with FSDP over the 8 GPUs and remat `full` (`docs/scaling.md`, 'GPU nodes', has the compile
that checks it).
"""

import ml_collections

from configs.study import shapes_cpu


def _steps(n: int) -> list:
  # DINOv2-style warm-ups at a tenth of the run (the base config's 12.5k of 125k).
  return [f'train.steps={n}', f'optim.warmup_steps={n // 10}',
          f'optim.freeze_last_layer_steps={max(1, n // 100)}',
          f'loss.teacher_temp_warmup_steps={3 * n // 10}', f'train.checkpoint_every={n // 20}']


def get_config():
  c = shapes_cpu.get_config()
  c.objectives = ml_collections.ConfigDict({'vtp': 'configs/vtp_l.py',
                                            'recon_only': 'configs/ae_baseline.py:vtp_l'})
  # The baseline reconstructs as many images a step as VTP does (512 of 4,096).
  c.objective_overrides = ml_collections.ConfigDict(
      {'recon_only': ['data.rec_batch_fraction=0.125']})
  # 5k to 40k steps at the paper's batch: 82M to 655M samples seen (the paper's runs: 1.1B).
  c.budgets = ml_collections.ConfigDict({'k05': _steps(5000), 'k10': _steps(10000),
                                         'k20': _steps(20000), 'k40': _steps(40000)})
  c.data_source = ''  # image-caption records for the tokenizers, e.g. arrayrecord:GLOB
  c.required = 'data_source,fid_weights'  # the study refuses to start while these are empty
  c.tokenizer_overrides = [
      'model.decoder.depth=4',  # the scaling studies' pixel decoder: 4 ViT-L layers [P]
      'mesh.data=1', 'mesh.fsdp=-1',
      'precision.remat_policy=full', 'precision.scan_layers=True',
      'evals.at_end=True', 'evals.dataset=tfds:imagenet2012:validation',
      'evals.train_dataset=tfds:imagenet2012:train']
  c.export.dataset = 'tfds:imagenet2012'
  c.export.split = 'train'
  c.generator.config = 'configs/dit_b.py'  # LightningDiT-B, the paper's study generator [P]
  c.generator.overrides = ['train.steps=100000']  # 80 epochs of 1.28M images at batch 1024 [V]
  c.generation_eval.dataset = 'tfds:imagenet2012:validation'
  c.generation_eval.num_images = 10000  # FID-10k [P]
  c.generation_eval.cfg_scale = 0.0  # the generator config's
  c.generation_eval.judge = False  # the judge reads vtp_shapes only
  return c
