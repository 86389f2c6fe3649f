"""Grading a learner's own backward pass against autograd, with a diagnosis of the first wrong row.

    solution.py    loading a solution file; what its functions receive and what they returned
    worker.py      the child process that runs the learner's code
    isolation.py   running a solution file in that child, with time limits
    grade.py       grade(): the rows, verdicts and notes of every exercise
    diagnoses.py   why the first wrong gradient is wrong
    results.py     GradeResult and its report
    starter.py     the starter file of `backprop-ninja exercise`
    notebook.py    grade_notebook(): a learner's own notebook, run top to bottom in a fresh Jupyter kernel
    notebook_source.py   reading the notebook first: exercises, cmp, offline and data-path changes
    notebook_kernel.py   the recorder inside that kernel (cmp calls, d<name> variables, the training loop)
    notebook_results.py  NotebookResult and its report
    notebook_cmp.py      `from backprop_ninja import cmp` and report(), in the learner's own kernel
"""
