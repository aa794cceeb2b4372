"""Ray Tune + Optuna over Ray Train runs (``run_tune.py``). With :mod:`bmtard_ray.ray_train`, the only
modules that import ray or optuna.

    settings.py      what an experiment is, and the checks done before Ray starts (pure Python)
    optuna_space.py  a SearchSpace as Optuna distributions / a define-by-run function; the seeded sampler
    trainable.py     the Tune function trainable: one Ray Train TorchTrainer per trial
    searcher.py      Ray's OptunaSearch, telling the study PRUNED for early stops, linking trials to Ray's
    experiment.py    Tuner / Tuner.restore, searcher, scheduler, epoch budget, ResultGrid -> records
    session.py       start (data, teachers, Ray, settings) and resume
    results.py       ranking, Pareto front, Parquet table, leaderboard (works on plain records)
    plots.py final.py report.py    PNG plots, the best student's test evaluation, the end-of-run report
    cli.py           run_tune.py's options
    review.py        --review: optuna-dashboard and TensorBoard on a folder, the Ray dashboard's address
"""
