"""Self-supervised pretraining configs: `configs/ssl.py[:echoclr|mi_simclr|echoclr_no_order|simclr|demo]`.

echoclr (default) = multi-instance NT-Xent + frame-order CE with the paper's hyperparameters; mi_simclr
drops frame order; echoclr_no_order is EchoCLR in every setting (shuffled views, curriculum) but the order
loss and head — the control that isolates the order task; simclr pairs two augmentations of one clip; demo
is a CPU-sized echoclr on synthetic_echo small (motion-sensitive stem init held fixed, balanced task
gradients) that finishes in minutes, with frame order well above chance while NT-Xent falls (README
"Pretraining").
"""
import ml_collections

from configs import common

VARIANTS = ('echoclr', 'mi_simclr', 'echoclr_no_order', 'simclr', 'demo')


def get_config(arg=None):
  from echojax.jobs.config_lib import parse_variant
  variant = parse_variant(arg, VARIANTS, 'echoclr')
  c = ml_collections.ConfigDict()
  c.mode = 'ssl'
  c.variant = variant
  c.seed = 0
  c.data = common.data_config(clip_len=4)
  c.model = common.model_config(width=64)
  c.ssl = ml_collections.ConfigDict(dict(
      pairing='multi_instance', temperature=0.05, order_weight=1.0,
      # frame-order-first curriculum (only with frame order; 0 and 0 = off, the paper): NT-Xent's gradient
      # into the encoder is 0 for order_only_steps, then ramps linearly to full over contrastive_warmup_steps;
      # the projection head learns NT-Xent throughout
      order_only_steps=0, contrastive_warmup_steps=0,
      # how NT-Xent's and the order CE's gradients combine where they enter the encoder: 'none' (their sum,
      # the paper) | 'equal_norm' (each rescaled to the same norm over the batch); models.gradient_fork
      gradient_balance='none',
      # which clips each loss reads: 'shared' (the paper: both on the shuffled clips) | 'separate' (NT-Xent on
      # the clips in recorded order, the order CE on their shuffled copies; twice the encoder work a step)
      order_input='shared',
      # keep the encoder's stem conv (3×7×7) at its init (with model.stem_motion_fraction: fixed motion
      # filters): trained jointly, NT-Xent rewrites the stem within ~100 steps and frame order never starts
      freeze_stem=False,
  ))
  c.optim = common.optim_config('adam', lr=0.1)      # paper: Adam, lr 0.1, constant
  c.train = ml_collections.ConfigDict(dict(
      global_batch_size=392,     # pairs (784 views), as the paper
      num_epochs=300, num_steps=-1,   # num_steps > 0 overrides epochs
      log_every_steps=50, checkpoint_every_steps=1000, keep_checkpoints=3,
      stop_after_steps=-1,       # > 0: stop (checkpointed) after this many steps of this invocation
      microbatch_size=0,         # GradCache: pairs per device per chunk (0 = off); exact full-batch NT-Xent
                                 # gradient on one chunk's activation memory; needs model.bn_group_size
                                 # dividing it (BN statistics cannot span chunks)
  ))
  c.probe = ml_collections.ConfigDict(dict(
      every_steps=1000, split='val', fit_split='train', max_videos=512, batch_size=32,
      label_key='severe_as'))
  c.distributed = common.distributed_config()

  if variant != 'demo':
    c.data.min_plax_prob = 0.5   # paper: PLAX videos only (view classifier's top class); no-op on synthetic_echo
  if variant in ('echoclr', 'demo', 'echoclr_no_order'):
    c.data.frame_order = True
  if variant == 'echoclr_no_order':
    c.ssl.order_weight = 0.0   # views shuffled as EchoCLR's, no order head (jobs.ssl.has_order_task)
  if variant == 'simclr':
    c.ssl.pairing = 'simclr'
    c.train.num_epochs = 520
  if variant == 'demo':
    c.model.width = 8
    c.model.stage_depths = (1, 1, 1, 1)
    c.model.stem_motion_fraction = 0.5   # without it frame order stays at chance for this budget (README)
    # The paper's objective (both losses from step 0) on a stem held at that motion init — trained, the stem
    # is rewritten by NT-Xent and order never leaves chance — with the two tasks' feature gradients at equal
    # norm (without it, seed 1 learned NT-Xent only); any curriculum left one task stuck (README).
    c.ssl.freeze_stem = True
    c.ssl.gradient_balance = 'equal_norm'
    c.data.image_size = 64
    c.train.global_batch_size = 32
    c.train.num_steps = 700
    c.train.log_every_steps = 10
    c.train.checkpoint_every_steps = 350
    c.optim.lr = 1e-3           # lr 0.1 is tuned for batch 392 × R3D-18; a tiny net needs less
    c.probe.every_steps = 350
    c.probe.max_videos = 256
  return c
