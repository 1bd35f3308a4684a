"""The report layer: the HTML report, the summary printed at the end, plots and the compare tables."""
