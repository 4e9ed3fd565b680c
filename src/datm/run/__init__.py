"""Running a plan: its tasks as a graph (`graph`), what each kind of task does (`bodies`), the
executors (`executors`), the checks before work starts (`preflight`) and the entry point (`runner`)."""
