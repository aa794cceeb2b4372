"""The three command-line tools (run_train.py, run_eval.py, run_tune.py) and the toolkit they share."""
