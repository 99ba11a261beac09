"""Evaluation suites of `saebench eval RUN --suite core,...`.

Each suite is a function (EvalInputs) -> its section of eval.json, the SAE's figures next to its random
baseline's and the settings and convention used (registry: saebench.evals.suites.SUITES). The core
suite's figures stay at the top level of eval.json ("sae", "random_baseline"); every other suite writes
eval.json[<suite>] and leaves the other sections as they are, so a suite can be rerun alone.
"""
