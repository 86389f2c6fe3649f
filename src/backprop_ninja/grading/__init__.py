"""Grading a learner's own backward pass against autograd, with a diagnosis of the first wrong row.

    solution.py    loading a solution file; what its functions receive and what they returned
    worker.py      the child process that runs the learner's code
    isolation.py   running a solution file in that child, with time limits
    grade.py       grade(): the rows, verdicts and notes of every exercise
    diagnoses.py   why the first wrong gradient is wrong
    results.py     GradeResult and its report
    starter.py     the starter file of `backprop-ninja exercise`
"""
