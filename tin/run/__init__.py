"""A run: its build, its loop, its folder and sinks, the console, saved runs loaded, the submission, the analysis."""
