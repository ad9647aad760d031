"""Model bundles, routing rules, the runner and the result types every model returns."""
