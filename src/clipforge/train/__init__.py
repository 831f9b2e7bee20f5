"""Training: CLIP/SigLIP losses, AdamW + cosine, GradCache accumulation, locked-tower feature cache,
DDP-style data parallelism under torchrun, atomic checkpoints with exact resume.

Python API::

    from clipforge.train import TrainConfig, train, fit
    result = train({"model": "towers:efficientnet-lite0+minilm-l6", "data": ["shards/train-{000000..000005}.tar"],
                    "output": "runs/lit", "epochs": 5, "batch_size": 256})
    model = fit(model, "shards/*.tar", TrainConfig(epochs=5, output="runs/lit"))
"""

from clipforge.train.config import TrainConfig
from clipforge.train.loop import fit, train
from clipforge.train.loss import ClipLoss, SigLipLoss

__all__ = ["ClipLoss", "SigLipLoss", "TrainConfig", "fit", "train"]
