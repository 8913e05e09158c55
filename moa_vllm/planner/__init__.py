"""Plan search: calibrate, profile, optimise (MILP), validate."""
