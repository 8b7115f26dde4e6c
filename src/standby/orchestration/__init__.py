"""Jobs and workflows: protect, replicate, fail over, commit, reverse, recovery plans."""
