"""Submit ``crossmae pretrain`` (or any other registered task's command: ``--task "cls
linprobe"``, ``"cls finetune"``, ``"det train"``, ``"seg train"``, ``"cls frozen"``, ...) to Slurm
through submitit, one task per GPU.

    python tools/submit.py --nodes 4 --gpus-per-node 8 --partition learn --timeout-min 4320 \\
        --config configs/pretrain/crossmae_vit_base_800ep_pred0.75.yaml \\
        data.path=/data/imagenet/train output_dir=runs/crossmae_b_800
    python tools/submit.py --task "det train" --config configs/det/mask_rcnn_vit_base_100ep.yaml \\
        encoder.checkpoint=runs/crossmae_b_800/checkpoint-last.pt ... output_dir=runs/det_b

Every task runs with ``--resume auto``. Slurm signals the job (USR2) before its time
limit, and submitit forwards preemption as well: the training loop then finishes its step, writes
``checkpoint-last.pt``, and hands the signal back to submitit, which requeues the job; the
requeued job continues from that checkpoint (a task that trains nothing evaluates again).

``--cluster local --wait`` runs the same task on this machine through submitit's local executor
(``--gpus-per-node 0 --tasks-per-node 2`` for a CPU check with gloo).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import submitit

from crossmae.checks import int_at_least


def task_commands() -> list[str]:
    """The registered tasks' commands (``crossmae.task``)."""
    from crossmae.task import tasks

    return [" ".join(t.command) for t in tasks()]


class Task(submitit.helpers.Checkpointable):
    """A picklable callable: set torch.distributed's variables from Slurm's, then run the task.
    ``checkpoint()`` (inherited) resubmits the same arguments, which resume automatically."""

    def __init__(self, task: str, argv: list[str]):
        self.task, self.argv = task, argv

    def __call__(self) -> int:
        from crossmae.cli import main

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return main([*self.task.split(), *self.argv, "--resume", "auto"])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--task",
        default="pretrain",
        type=lambda t: t.removeprefix("crossmae "),
        choices=task_commands(),
        help="a task's command",
    )
    parser.add_argument("--cluster", choices=["slurm", "local"], default="slurm")
    parser.add_argument("--nodes", type=int_at_least(1), default=1)
    parser.add_argument("--gpus-per-node", type=int_at_least(0), default=8)
    parser.add_argument(
        "--tasks-per-node", type=int_at_least(1), default=None, help="default: one per GPU"
    )
    parser.add_argument("--cpus-per-task", type=int_at_least(1), default=10)
    parser.add_argument("--partition", default=None)
    parser.add_argument("--timeout-min", type=int_at_least(1), default=72 * 60)
    parser.add_argument(
        "--signal-delay-s",
        type=int_at_least(0),
        default=120,
        help="USR2 this early before the limit",
    )
    parser.add_argument("--job-name", default="crossmae")
    parser.add_argument("--wait", action="store_true", help="block until the job ends")
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("overrides", nargs="*", help="key=value; output_dir=... is required")
    args = parser.parse_args()

    out = [o.split("=", 1)[1] for o in args.overrides if o.startswith("output_dir=")]
    if not out:
        parser.error("output_dir=... is required: requeued jobs resume from it")
    log_dir = Path(out[-1]) / "slurm"
    executor = submitit.AutoExecutor(folder=log_dir, cluster=args.cluster)
    executor.update_parameters(
        name=args.job_name,
        nodes=args.nodes,
        tasks_per_node=args.tasks_per_node or args.gpus_per_node,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        timeout_min=args.timeout_min,
        slurm_partition=args.partition,
        slurm_signal_delay_s=args.signal_delay_s,
    )
    argv = [a for c in args.config for a in ("--config", c)] + args.overrides
    job = executor.submit(Task(args.task, argv))
    print(f"submitted job {job.job_id}; logs in {log_dir}")
    if args.wait:
        codes = job.results()  # raises with the task's traceback if one failed
        print(f"job {job.job_id} finished: exit codes {codes}")
        return max(codes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
