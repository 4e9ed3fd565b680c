"""Analysis of finished runs: typed results (`results`), the comparison of runs (`analyze`) and the
report (`report`)."""
