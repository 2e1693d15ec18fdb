"""Pattern estimators (where to compute). Filled by the estimator issue."""
