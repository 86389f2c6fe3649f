"""The lecture's tour: makemore part 4's network, chunked into its 20 named intermediates.

    network.py            the chunked forward pass, Exercise 1 step by step, Exercises 2 and 3 fused,
                          autograd's reference
    fixture.py            the lecture's check set up as its cells do (seeded parameters, then the batch)
    exercises.py          the exercises' table: function, title, rows; our own answers
    solution_template.py  the starter that `backprop-ninja exercise FILE` writes
"""

from backprop_ninja.lecture.network import (
    BACKWARD_ORDER, PARAM_NAMES, ZERO_GRADIENTS, Intermediates, autograd_reference, backward, batchnorm_backward,
    cross_entropy_backward, forward, gradient_scale,
)

__all__ = [
    "BACKWARD_ORDER", "PARAM_NAMES", "ZERO_GRADIENTS", "Intermediates", "autograd_reference", "backward",
    "batchnorm_backward", "cross_entropy_backward", "forward", "gradient_scale",
]
