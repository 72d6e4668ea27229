"""Pure PyTorch reference of every cell and normalization: the definition of the mathematics."""
from .gru import gru_sequence
from .lstm import lstm_sequence
from .norms import batch_norm_step, layer_norm, sequence_batch_norm
from .rnn import rnn_sequence

__all__ = ["lstm_sequence", "gru_sequence", "rnn_sequence", "batch_norm_step", "layer_norm",
           "sequence_batch_norm"]
