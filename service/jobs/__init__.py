"""Training jobs: rows in the registry database (store) claimed and run by any replica (runner)."""

from service.jobs.runner import JobRunner
from service.jobs.store import JobInfo, JobState, LeaseLost

__all__ = ["JobInfo", "JobRunner", "JobState", "LeaseLost"]
