"""Study tools on top of the harness: sweep grids, run directories, the runner, metrics, plots, reports."""
