"""Running a job: units of work diffed against the ledger, the three stages (prepare, encode, write) on threads or Ray actors, the run summary."""
