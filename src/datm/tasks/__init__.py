"""A plan as a graph of small tasks, and the executors that run them.

train(adapter) → merge(group) → translate(direction) → score → report. Each task names the tasks it
needs and the artifacts it writes (relative to the run directory); it claims its artifact before
building it, so any number of processes (`datm run`s, Ray workers, SLURM array jobs) cooperate.
"""

from datm.tasks.graph import KINDS, Task, build_tasks, task_status
from datm.tasks.work import Worker, execute

__all__ = ["KINDS", "Task", "Worker", "build_tasks", "execute", "task_status"]
