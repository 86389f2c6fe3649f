"""Proving hand-written gradients right: the one verdict policy and the checks built on it.

    verdict.py             when a gradient is right: the lecture's row (shown) and judge() (decided)
    finite_differences.py  float64 central differences, the reference that needs only a forward pass
    lecture_check.py       `check`: the lecture network's 26 tensors and Exercises 2-3
    model_check.py         `check --model NAME`: every layer output and parameter of a registry model
    verify.py              `train --verify-every`: one training step's gradients against autograd
    diagnoses.py           what the numbers of a wrong gradient tell, shared by every checker
    backward.py            check_backward: an engineer's own backward pass (a Function, a callable, a pair)
    backward_worker.py     the child process that runs an op file for `check --function`
    isolated.py            `check --function FILE:NAME`: the op file checked in that child
"""
