"""The controlled study end to end: stages with cached artifacts, results, plots and report."""
