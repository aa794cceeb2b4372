"""The training core, pure PyTorch (no Ray, no Optuna): one step per method (:mod:`.methods`), the trainer's
epoch loop (:mod:`.trainer`), the balance (:mod:`.balance`, :mod:`.entropy_solve`), the losses, the training
attacks, the frozen teachers, the numbers a run reports (:mod:`.metrics`) and the files it leaves
(:mod:`.outputs`)."""
