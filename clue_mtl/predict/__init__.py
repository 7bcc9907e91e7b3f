"""From weights to scores and zips: prediction, submissions, macro-F1, evaluation, the TF-IDF baseline, blends, weight averages."""
