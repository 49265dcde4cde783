"""The training API in one import, for Python users (the layers live in their own modules):

    setup.py        setup (QLoRA, LoRA, grad checkpointing), make_schedule, make_optimizer
    step.py         make_step, snapshot / rollback
    objectives.py   Objective, SFT;  preference.py: DPO, ORPO
    loop.py         train (the run: steps, validation, checkpoints, resume), TrainResult
    evaluation.py   evaluate_dataset (used by `mlx-gemma evaluate`, the loop and the report)
    job.py          run_training, run_main_job and the CLI-facing helpers

    adapter_config = setup(model, args)
    result = train(model, tokenizer, args, train_set, valid_set, test_set,
                   adapter_config=adapter_config, optimizer=None, loss=None)   # loss: SFT(), DPO(), ORPO()
"""

from .args import TrainArgs, check_args, load_config_file, resolve_defaults  # noqa: F401
from .evaluation import evaluate_dataset, progress_bar  # noqa: F401
from .job import (default_data_dir, load_training_data, make_objective, prepare_out_dir, restore_options,  # noqa: F401
                  run_main_job, run_training, train_argv)
from .loop import NonFiniteLoss, Progress, TrainResult, data_fingerprint, train  # noqa: F401
from .objectives import SFT, Objective  # noqa: F401
from .preference import DPO, ORPO  # noqa: F401
from .setup import enable_grad_checkpoint, make_optimizer, make_schedule, setup  # noqa: F401
from .step import make_step, rollback, snapshot  # noqa: F401
