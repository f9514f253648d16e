"""Fine-tune ImageNet ResNet-50 (from `init_from`) on any folder of classes: ROOT/{train,val}/<class>/*.

  python -m resnet_jax.main --config=configs/finetune_folder.py --workdir=/tmp/pets \
    --config.init_from=/tmp/resnet50 --config.data.image_folder=ROOT

From the paper: the network, its input (224 crops, the scale augmentation and 1-crop evaluation of section
3.4), SGD with momentum 0.9 and weight decay 1e-4, and `model.freeze_bn` for the detection recipe (BN
statistics and affine terms fixed, appendix A). Our choices for a short run on a small dataset: lr 0.01
(a tenth of training from scratch, as the backbone is already trained), 5,000 steps of batch 64 with the
lr divided by 10 at 50% and 75% of them, the classifier's size from the folder count (model.num_classes=0),
BN statistics as training leaves them (no exact recomputation), and the source's own BN in training mode
unless model.freeze_bn. A converted model expects its framework's preprocessing: pass the data.* fields
of the source's config.json (e.g. channel_mean and channel_std for torchvision) for the closest start.
The network is ResNet-50's: for another source, set its model fields too (an 18-layer torchvision
source: --config.model.depth=18); a mismatch stops before training and names the flags to add.
"""

from resnet_jax import defaults


def get_config():
  config = defaults.get_imagenet_config()
  config.name = 'finetune_folder'
  config.init_from = ''  # required: --config.init_from=WORKDIR (trained or converted)
  config.model.depth = 50
  config.model.shortcut = 'B'
  config.model.num_classes = 0  # the folder's number of classes
  config.data.source = 'image_folder'  # ROOT/train/<class>/*, ROOT/val/<class>/*
  config.data.mean_images = 1_000

  config.train.batch_size = 64
  config.train.num_steps = 5_000
  config.train.log_every_steps = 50
  config.train.eval_every_steps = 500
  config.train.checkpoint_every_steps = 500
  config.train.recompute_bn_stats = False
  config.train.bn_stats_images = 2_000  # the exact-BN error reported beside the final one

  config.optimizer.learning_rate = 0.01
  config.optimizer.schedule = 'steps'
  config.optimizer.boundaries_at = 'fractions'
  config.optimizer.boundary_fractions = (0.5, 0.75)
  return config
