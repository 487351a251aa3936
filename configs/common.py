"""Shared config blocks (data, model, optimiser, training loop, distributed) used by every echojax config.

Every key a trainer reads is declared here with its default, so `--config.x=y` overrides are checked by
ml_collections (a typo is an error, not a silently ignored flag).
"""
import ml_collections

from echojax.data import options as data_options


def data_config(name='synthetic_echo', builder_config='small', clip_len=4) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name=name,                       # TFDS builder under data_builders/ (or any registered builder)
      builder_config=builder_config,   # e.g. synthetic_echo: small | benchmark
      data_dir='',                     # '' → TFDS default (~/tensorflow_datasets)
      manual_dir='',                   # for builders over the user's own files (echo_studies, echonet_*)
      auto_build=True,                 # build the dataset first if it is absent
      rebuild=False,                   # rebuild it (after label/table/option changes; a stale build stops a run)
      min_plax_prob=None,              # echo_studies: keep videos with plax_prob >= this (None = all; unknown kept, counted)
      views=None,                      # echo_studies: keep videos whose `view` column is one of these (None = all)
      train_split='train', val_split='val', test_split='test',
      # clip lengths, frame order, pairing, image size, augmentation, shuffling: the pipeline's options,
      # whose defaults (and meaning) live once, in echojax/data/options.py
      **dict(data_options.pipeline_defaults(), clip_len=clip_len),
  ))


def model_config(width=64) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      width=width, stage_depths=(2, 2, 2, 2),
      conv_impl='auto',                # auto: XLA conv on GPU/TPU, GEMM fast path on CPU
      dtype='auto',                    # compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU | float32 |
                                       # bfloat16 (params, BN statistics, losses, optimiser stay float32)
      remat=False,                     # rematerialise residual blocks: ~1 extra forward, far less memory
      stem_motion_fraction=0.0,        # share of stem filters initialised as temporal differences (0 = torch
                                       # init, as the paper); 0.5 lets frame order learn on a CPU budget
      projection='paper', proj_hidden=256, proj_dim=128,   # paper head: 512→256→128, no bias
      bn_mode='global',                # global: one encoder call over both views | per_view: paper code
      bn_group_size=0,                 # ghost BN: statistics per group of G consecutive examples (SSL:
                                       # pairs, fine-tuning: clips); 0 = the whole global batch
  ))


def optim_config(name='adam', lr=0.1) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name=name, lr=lr, lr_scaling='none', base_batch_size=256,
      schedule='constant', warmup_steps=0, warmup_fraction=0.0, end_lr_factor=0.0,
      weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, momentum=0.9, nesterov=False, trust_coefficient=0.001,
      grad_clip_norm=0.0,
  ))


def distributed_config() -> ml_collections.ConfigDict:
  # mode 'auto': initialise jax.distributed when the environment describes a multi-process job.
  return ml_collections.ConfigDict(dict(mode='auto', coordinator_address='', num_processes=0,
                                        process_id=-1, local_device_ids='',
                                        # a peer silent this long (dead or hung) ends every survivor
                                        # (exit 76); 5–90 s, below JAX's own 100 s heartbeat abort
                                        peer_timeout_s=60.0))
