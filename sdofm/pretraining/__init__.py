"""Ray Train pretraining of the backbones (``pretrain``) and its worker loop."""

from sdofm.pretraining.run import PretrainResult, pretrain

__all__ = ["PretrainResult", "pretrain"]
