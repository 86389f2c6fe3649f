"""Forward/backward pairs of every op the models use, written by hand at tensor level.

Each op is two free functions side by side, as in cs231n's layers.py:

    out, cache = op_forward(inputs...)
    dinputs... = op_backward(dout, cache)

Gradients come back in the order of the forward's inputs; caches are small named tuples. The
conventions (dimension letters, the gradient policy, the weight layout, BatchNorm's eps and
Bessel's correction) are stated once, in backprop_ninja.conventions.

One module per family: embedding, shape (flatten), linear, activations, batchnorm, loss.
For the sequence models: gates (sigmoid), sequence_loss, causal (bag of words), recurrent (RNN, GRU)
and native_recurrent (their loop over a sequence in C, sequence_kernels.c, where the tensors allow it),
and embedding's position table. For the transformer: layernorm, gelu, attention (softmax, the qkv split
into heads, causal attention, the head merge), fused_transformer (the same maths in fewer passes) and
native_transformer (the same maths in C, transformer_kernels.c, where the tensors allow it),
and packing (a batch of sequences to the rows of its live positions, and back).
"""

from backprop_ninja.conventions import BATCHNORM_EPS, IGNORE_INDEX
from backprop_ninja.ops.activations import TanhCache, one_minus_square, tanh_backward, tanh_forward
from backprop_ninja.ops.batchnorm import (
    BatchNormCache, BatchStats, batchnorm_backward, batchnorm_dims, batchnorm_forward, batchnorm_inference,
)
from backprop_ninja.ops.embedding import (
    EmbeddingCache, PositionEmbeddingCache, embedding_backward, embedding_forward, position_embedding_backward,
    position_embedding_forward,
)
from backprop_ninja.ops.linear import LinearCache, linear_backward, linear_forward
from backprop_ninja.ops.loss import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from backprop_ninja.ops.shape import FlattenCache, flatten_consecutive_backward, flatten_consecutive_forward
from backprop_ninja.ops.causal import CausalBoWCache, causal_bow_backward, causal_bow_forward
from backprop_ninja.ops.gates import SigmoidCache, sigmoid_backward, sigmoid_forward
from backprop_ninja.ops.recurrent import (
    GRUCache, GRUStepCache, RNNCache, RNNStepCache, gru_backward, gru_forward, gru_step_backward, gru_step_forward,
    rnn_backward, rnn_forward, rnn_step_backward, rnn_step_forward,
)
from backprop_ninja.ops.attention import (
    CausalAttentionCache, MergeHeadsCache, SoftmaxCache, SplitHeadsCache, attention_entropy, attention_weights,
    causal_attention_backward, causal_attention_forward, causal_mask, merge_heads_backward, merge_heads_forward,
    softmax_backward, softmax_forward, split_heads_backward, split_heads_forward,
)
from backprop_ninja.ops.dropout import DropoutCache, dropout_backward, dropout_forward
from backprop_ninja.ops.gelu import GELUCache, gelu_backward, gelu_forward
from backprop_ninja.ops.layernorm import LAYERNORM_EPS, LayerNormCache, layernorm_backward, layernorm_forward
from backprop_ninja.ops.sequence_loss import (
    SequenceCrossEntropyCache, sequence_cross_entropy_backward, sequence_cross_entropy_forward,
)

__all__ = [
    "BATCHNORM_EPS", "BatchNormCache", "BatchStats", "CrossEntropyCache", "EmbeddingCache", "FlattenCache",
    "LinearCache", "TanhCache", "batchnorm_backward", "batchnorm_dims", "batchnorm_forward", "batchnorm_inference",
    "cross_entropy_backward", "cross_entropy_forward", "embedding_backward", "embedding_forward",
    "flatten_consecutive_backward", "flatten_consecutive_forward", "linear_backward", "linear_forward",
    "one_minus_square", "tanh_backward", "tanh_forward",
    "PositionEmbeddingCache", "position_embedding_backward", "position_embedding_forward",
    "CausalBoWCache", "GRUCache", "GRUStepCache", "IGNORE_INDEX", "RNNCache", "RNNStepCache",
    "SequenceCrossEntropyCache", "SigmoidCache", "causal_bow_backward", "causal_bow_forward",
    "gru_backward", "gru_forward", "gru_step_backward", "gru_step_forward",
    "rnn_backward", "rnn_forward", "rnn_step_backward", "rnn_step_forward",
    "sequence_cross_entropy_backward", "sequence_cross_entropy_forward", "sigmoid_backward", "sigmoid_forward",
    "CausalAttentionCache", "GELUCache", "LAYERNORM_EPS", "LayerNormCache", "MergeHeadsCache", "SoftmaxCache",
    "SplitHeadsCache", "attention_entropy", "attention_weights", "causal_attention_backward",
    "causal_attention_forward", "causal_mask", "gelu_backward", "gelu_forward", "layernorm_backward",
    "layernorm_forward", "merge_heads_backward", "merge_heads_forward", "softmax_backward", "softmax_forward",
    "split_heads_backward", "split_heads_forward",
    "DropoutCache", "dropout_backward", "dropout_forward",
]
